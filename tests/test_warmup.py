"""Warm-up (SFT) stage: the shipped recipe through the real CLI, the SFT loss on a tiny overfit set, and the
prompts it trains on (the RL data module's exact variant text)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from diva_lightning.cli import main as cli_main
from diva_lightning.core.tiers import VariantSpec
from diva_lightning.data.variants import render_variant
from diva_lightning.data.world import format_response, generate_world
from diva_lightning.models.policy import load_policy
from diva_lightning.rewards import format_reward
from diva_lightning.rollout.hf import HFGenerateEngine
from diva_lightning.system.warmup import SFTDataModule, SFTModule, SFTWorld, _SFTExamples, hinted_problem

RECIPE = Path(__file__).resolve().parents[1] / "experiments" / "warmup.yaml"


def test_recipe_parses_through_the_real_cli(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["warmup", "--config", str(RECIPE), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    shipped = yaml.safe_load(RECIPE.read_text())
    assert printed["model"]["dims"] == shipped["model"]["dims"]
    assert printed["data"]["world"] == shipped["data"]["world"]
    assert printed["trainer"]["max_steps"] == shipped["trainer"]["max_steps"]


def test_sft_prompts_are_the_rl_variant_texts() -> None:
    records = generate_world(40, seed=3)
    rec = records[0]
    spec = VariantSpec("hint", "hard", -1.0, hint_steps=2, paraphrase_index=1)
    assert hinted_problem(rec, 2, 1) == render_variant(rec, spec).prompt
    ds = _SFTExamples(records, paraphrase_fraction=0.3, hint_fraction=0.3, seed=0)
    kinds = {"original": 0, "paraphrase": 0, "hint": 0}
    for i in range(len(ds)):
        problem, response, image = ds[i]
        r = records[i]
        assert image.shape == (3, 112, 112)
        assert ds[i][0] == problem  # deterministic per index
        kind = "hint" if "\nHint:" in problem else "original" if problem == r.problem else "paraphrase"
        if kind == "hint":  # the target goes on after the hinted steps, whose text ends the prompt
            shown = problem.split("\nHint: ")[1]
            k = next(k for k in range(1, len(r.think_steps)) if " ".join(r.think_steps[:k]) == shown)
            assert response == format_response(r, after_hint=k)
        else:
            assert response == format_response(r)
        assert kind != "paraphrase" or problem in r.variants
        kinds[kind] += 1
    assert all(v > 0 for v in kinds.values()), kinds


@pytest.mark.slow  # ~10 s on 2 idle cores (30 steps); much longer on a loaded machine
def test_sft_loss_falls_on_a_tiny_overfit_set() -> None:
    torch.manual_seed(0)
    records = generate_world(8, seed=5)
    module = SFTModule(dims={}, lr=3e-3)
    bundle = module.build_policy(records)
    ds = _SFTExamples(records, paraphrase_fraction=0.0, hint_fraction=0.0, seed=0)
    problems, responses, images = zip(*[ds[i] for i in range(len(ds))])
    opt = torch.optim.AdamW(bundle.model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, token_acc = module.sft_loss(list(problems), list(responses), list(images))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    # random init: about ln(vocab) ~ 6.2 nats per token; 30 steps on 8 examples must at least halve it
    assert losses[0] > 5.0
    assert losses[-1] < 0.5 * losses[0], losses
    assert 0.0 <= float(token_acc) <= 1.0


@pytest.mark.slow
def test_warmup_cli_end_to_end_writes_a_loadable_generating_policy(tmp_path: Path) -> None:
    out = tmp_path / "policy"
    cli_main(["warmup", "--config", str(RECIPE), "--output_dir", str(out), "--trainer.max_steps", "3",
              "--data.world.size", "16", "--data.batch_size", "4",
              "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar",
              "false", "--trainer.enable_model_summary", "false"])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (out / name).is_file(), name
    # build_info.json names the build: the weights' hash (recomputed here) and the machine facts behind it
    import hashlib
    import json

    info = json.loads((out / "build_info.json").read_text())
    assert info["weights_sha256"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert info["sft_steps"] == 3 and info["torch"] == torch.__version__
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and info["cpu_model"]
    bundle = load_policy(out)
    assert bundle.tokenizer.convert_tokens_to_ids("<think>") != bundle.tokenizer.unk_token_id
    records = generate_world(2, seed=0, split="val")
    dm = SFTDataModule(world=SFTWorld(size=2))
    assert dm.world.size == 2
    from diva_lightning.data.schema import decode_image

    inputs = bundle.encode([r.problem for r in records], [[decode_image(r.images[0], None)] for r in records])
    roll = HFGenerateEngine().generate(bundle, inputs, num_generations=2, max_new_tokens=8, seed=0)
    assert roll.num_responses == 4 and roll.completion_ids.shape == (4, 8) or bool(roll.finished.any())
    assert not torch.isin(roll.completion_ids, torch.tensor(bundle.vision_token_ids)).any()
    assert all(isinstance(t, str) for t in roll.texts)
    assert all(format_reward(t) in (0.0, 1.0) for t in roll.texts)
