"""Sweeps over the DIVA-GRPO platform: the Table 2 ablation matrix (`ablate`), a TPE search over DIVA's knobs
(`search`) and the report (`report`). See docs/sweeps.md.
"""
