"""Every shipped YAML parses through the real CLI, each ablation switches off exactly its component, and every
class_path in the configs, docs and tests names an importable class."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from diva_lightning.callbacks import DifficultyCallback
from diva_lightning.cli import run_cli
from diva_lightning.system.datamodule import DivaDataModule
from diva_lightning.system.module import DivaGRPOModule
from diva_lightning.training.estimators import DivaAdvantage, GRPOAdvantage

REPO = Path(__file__).resolve().parents[1]
FULL = REPO / "experiments/full.yaml"
OVERLAYS = {
    "grpo": REPO / "experiments/grpo.yaml",
    "no_variants": REPO / "experiments/ablate/no_variants.yaml",
    "no_difficulty_weighting": REPO / "experiments/ablate/no_difficulty_weighting.yaml",
    "no_rrb": REPO / "experiments/ablate/no_rrb.yaml",
    "no_gl_balance": REPO / "experiments/ablate/no_gl_balance.yaml",
}
GRPO_N5 = REPO / "experiments/grpo_n5.yaml"  # stacked on grpo.yaml
FSDP = REPO / "experiments/fsdp.yaml"  # a sharding overlay for any job
DAPO = REPO / "experiments/dapo.yaml"  # stacked on grpo.yaml
# What each overlay may change relative to full.yaml (besides the logger's experiment name).
EXPECTED_DIFF = {
    "grpo": {"model.init_args.num_generations", "model.init_args.advantage", "data.init_args.num_variants",
             "trainer.callbacks"},
    "no_variants": {"model.init_args.num_generations", "data.init_args.num_variants"},
    "no_difficulty_weighting": {"model.init_args.advantage.init_args.difficulty_weighting"},
    "no_rrb": {"model.init_args.advantage.init_args.rrb"},
    "no_gl_balance": {"model.init_args.advantage.init_args.batch_norm"},
}


def _cli(*configs: Path, tmp_path: Path) -> Any:
    args = [a for c in configs for a in ("--config", str(c))]
    args += ["--trainer.logger.init_args.save_dir", str(tmp_path)]
    return run_cli(args, run=False)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """Leaf keys of a nested config dict ("a.b.c": value); lists (callbacks) stay whole values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _resolved(cli: Any) -> dict[str, Any]:
    cfg = cli.parser.dump(cli.config, format="yaml", skip_none=False)
    import yaml

    return _flat(yaml.safe_load(cfg))


def test_full_config_builds_the_documented_system(tmp_path: Path) -> None:
    cli = _cli(FULL, tmp_path=tmp_path)
    assert isinstance(cli.model, DivaGRPOModule) and isinstance(cli.datamodule, DivaDataModule)
    assert isinstance(cli.model.advantage, DivaAdvantage)
    assert cli.model.advantage.batch_norm and cli.model.advantage.difficulty_weighting
    assert cli.model.advantage.rrb == "range"
    assert cli.datamodule.num_variants == 1 and cli.model.num_generations == 5
    # argument links: one seed, and G reaches the data module
    assert cli.datamodule.seed == cli.model.seed == 0
    assert cli.datamodule.num_generations == 5
    assert any(isinstance(c, DifficultyCallback) for c in cli.trainer.callbacks)


@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_overlay_changes_exactly_its_component(name: str, tmp_path: Path) -> None:
    full = _resolved(_cli(FULL, tmp_path=tmp_path))
    cli = _cli(FULL, OVERLAYS[name], tmp_path=tmp_path)
    over = _resolved(cli)
    changed = {k for k in set(full) | set(over) if full.get(k) != over.get(k)}
    changed = {k for k in changed if "logger" not in k}
    allowed = EXPECTED_DIFF[name]
    stray = {k for k in changed if not any(k == a or k.startswith(a + ".") for a in allowed)}
    missing = {a for a in allowed if not any(k == a or k.startswith(a + ".") for k in changed)}
    assert not stray, f"{name} changes keys it should not: {sorted(stray)}"
    assert not missing, f"{name} does not change: {sorted(missing)}"
    # rollout budget per question is the same as full's (V+1) * G
    assert (cli.datamodule.num_variants + 1) * cli.model.num_generations == 10
    assert cli.datamodule.num_generations == cli.model.num_generations  # the link
    adv = cli.model.advantage
    if name == "grpo":
        assert isinstance(adv, GRPOAdvantage) and cli.datamodule.num_variants == 0
        assert not any(isinstance(c, DifficultyCallback) for c in cli.trainer.callbacks)
    elif name == "no_difficulty_weighting":
        assert adv.difficulty_weighting is False
    elif name == "no_rrb":
        assert adv.rrb is None
    elif name == "no_gl_balance":
        assert adv.batch_norm is False
    elif name == "no_variants":
        assert cli.datamodule.num_variants == 0 and isinstance(adv, DivaAdvantage)


def test_grpo_n5_keeps_the_budget_at_divas_group_size(tmp_path: Path) -> None:
    grpo = _resolved(_cli(FULL, OVERLAYS["grpo"], tmp_path=tmp_path))
    cli = _cli(FULL, OVERLAYS["grpo"], GRPO_N5, tmp_path=tmp_path)
    over = _resolved(cli)
    changed = {k for k in set(grpo) | set(over) if grpo.get(k) != over.get(k) and "logger" not in k}
    assert changed == {"model.init_args.num_generations", "data.init_args.questions_per_step"}
    full = _cli(FULL, tmp_path=tmp_path)
    # same rollouts per step as full (B x (V+1) x G = 8 x 2 x 5 = 80), prompt groups as large as DIVA's
    assert cli.datamodule.questions_per_step * cli.model.num_generations == 80 == (
        full.datamodule.questions_per_step * (full.datamodule.num_variants + 1) * full.model.num_generations)
    assert cli.model.num_generations == full.model.num_generations == cli.datamodule.num_generations
    assert isinstance(cli.model.advantage, GRPOAdvantage) and cli.datamodule.num_variants == 0


def test_fsdp_overlay_shards_and_changes_nothing_else(tmp_path: Path) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    full = _resolved(_cli(FULL, tmp_path=tmp_path))
    cli = _cli(FULL, FSDP, tmp_path=tmp_path)
    over = _resolved(cli)
    changed = {k for k in set(full) | set(over) if full.get(k) != over.get(k)}
    assert all(k == "trainer.devices" or k.startswith("trainer.strategy") for k in changed), changed
    assert isinstance(cli.trainer.strategy, ModelParallelStrategy) and cli.trainer.num_devices == 2
    assert over["trainer.strategy.init_args.data_parallel_size"] == 2
    assert over["trainer.strategy.init_args.tensor_parallel_size"] == 1


def test_dapo_is_grpo_plus_dynamic_sampling(tmp_path: Path) -> None:
    grpo = _resolved(_cli(FULL, OVERLAYS["grpo"], tmp_path=tmp_path))
    cli = _cli(FULL, OVERLAYS["grpo"], DAPO, tmp_path=tmp_path)
    over = _resolved(cli)
    changed = {k for k in set(grpo) | set(over) if grpo.get(k) != over.get(k) and "logger" not in k}
    assert changed == {f"model.init_args.dynamic_sampling.{k}" for k in ("max_draws", "unit", "metric")}
    assert cli.model.dynamic_sampling.max_draws == 3 and cli.model.dynamic_sampling.unit == "prompt"


def test_warmup_config_parses(tmp_path: Path) -> None:
    from diva_lightning.system.warmup import SFTDataModule, SFTModule, WarmupCLI

    cli = WarmupCLI(SFTModule, SFTDataModule, run=False, args=[
        "--config", str(REPO / "experiments/warmup.yaml"), "--output_dir", str(tmp_path / "p"),
        "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert cli.model.output_dir == str(tmp_path / "p")


def test_every_shipped_yaml_is_covered() -> None:
    shipped = {p.resolve() for p in (REPO / "experiments").rglob("*.yaml")}
    covered = {FULL.resolve(), GRPO_N5.resolve(), FSDP.resolve(), DAPO.resolve(),
               (REPO / "experiments/warmup.yaml").resolve()}
    covered |= {p.resolve() for p in OVERLAYS.values()}
    covered.add((REPO / "experiments/eval/table1.yaml").resolve())  # tests/test_evaluation_cli.py
    # the paper's recipe, its difficulty option and the seed's baselines: tests/test_paper_recipe.py
    covered |= {(REPO / p).resolve() for p in ("experiments/paper/diva_qwen2_5_vl_7b.yaml",
                                               "experiments/paper/official_difficulty.yaml",
                                               "experiments/share_grpo.yaml", "experiments/mm_eureka.yaml",
                                               "experiments/paper/released_code.yaml",
                                               "experiments/paper/paper_formulas.yaml",
                                               "experiments/grpo_released.yaml")}
    # the skewed world: tests/data/test_skew.py (composition from the shipped table), tests/models/test_embedded.py
    covered.add((REPO / "experiments/skewed.yaml").resolve())
    covered.add((REPO / "experiments/skewed_replicate.yaml").resolve())  # tests/test_skewed_replicate.py
    assert shipped == covered, f"untested configs: {sorted(map(str, shipped - covered))}"


def test_every_key_in_full_is_commented() -> None:
    for line in FULL.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("- class_path"):
            continue
        key, _, value = stripped.partition(":")
        if value.strip() and not value.strip().startswith("#"):
            assert "#" in value, f"full.yaml: key {key!r} has no comment"


# A dotted name of a class: a package the configs draw from, modules, then a capitalised last part.
_CLASS_NAME = re.compile(r"\b((?:diva_lightning|lightning|torch|tests)(?:\.[a-z_][a-z0-9_]*)+\.[A-Z]\w*)\b")


def _class_paths(node: Any) -> set[str]:
    """Every ``class_path`` value of a parsed config (nested init_args and lists included)."""
    if isinstance(node, dict):
        own = {node["class_path"]} if isinstance(node.get("class_path"), str) else set()
        return own.union(*(_class_paths(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_class_paths(v) for v in node))
    return set()


def _class_references() -> dict[str, set[str]]:
    """dotted class name -> the files naming it: every class_path of every shipped config (parsed), and the dotted
    class names on the lines of the configs' comments, docs/*.md and README.md that name a class_path, and in the
    quoted strings of tests/, sweeps/, benchmarks/ and examples/."""
    import yaml

    refs: dict[str, set[str]] = {}

    def add(names: set[str], path: Path) -> None:
        for name in names:
            refs.setdefault(name, set()).add(str(path.relative_to(REPO)))

    for path in sorted((REPO / "experiments").rglob("*.yaml")):
        add(_class_paths(yaml.safe_load(path.read_text())), path)
    for path in [*sorted((REPO / "experiments").rglob("*.yaml")), *sorted((REPO / "docs").glob("*.md")),
                 REPO / "README.md"]:
        add({n for line in path.read_text().splitlines() if "class_path" in line for n in _CLASS_NAME.findall(line)},
            path)
    for folder in ("tests", "sweeps", "benchmarks", "examples"):
        for path in sorted((REPO / folder).rglob("*.py")):
            add(set(re.findall(r"[\"']" + _CLASS_NAME.pattern + r"[\"']", path.read_text())), path)
    return refs


def _resolve(name: str) -> object:
    """The object a dotted name names, importing the longest importable module prefix (as jsonargparse does)."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


def test_every_class_path_in_configs_docs_and_tests_names_an_importable_class() -> None:
    """A class that moves (or is renamed) without its references in configs, docs and tests fails here, naming the
    files that still name it."""
    refs = _class_references()
    # the shipped configs' components, the docs' examples and the tests' strings are all found
    for name in ("diva_lightning.system.module.DivaGRPOModule", "diva_lightning.training.estimators.DivaAdvantage",
                 "lightning.pytorch.loggers.CSVLogger", "diva_lightning.rewards.FunctionReward"):
        assert name in refs, name
    broken = {}
    for name, files in sorted(refs.items()):
        try:
            obj = _resolve(name)
        except (ImportError, AttributeError) as err:
            broken[name] = f"{sorted(files)}: {err}"
            continue
        if not inspect.isclass(obj):
            broken[name] = f"{sorted(files)}: not a class but {type(obj).__name__}"
    assert not broken, "class paths that resolve to no class:\n" + "\n".join(f"{k} in {v}" for k, v in broken.items())
