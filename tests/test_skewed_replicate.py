"""experiments/skewed_replicate.yaml (issue 27) through the real CLI: on top of skewed.yaml it changes only the
validation split's size and cadence, and 178 is the largest split the shipped table's validation pool can give."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from diva_lightning.cli import run_cli
from diva_lightning.data.skew import share_counts

REPO = Path(__file__).resolve().parents[1]
FULL, SKEWED = REPO / "experiments/full.yaml", REPO / "experiments/skewed.yaml"
REPLICATE = REPO / "experiments/skewed_replicate.yaml"


def _cli(*configs: Path, tmp_path: Path, extra: tuple[str, ...] = ()) -> Any:
    args = [a for c in configs for a in ("--config", str(c))]
    return run_cli([*args, "--trainer.logger.init_args.save_dir", str(tmp_path), *extra], run=False)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_replicate_overlay_changes_only_the_validation_split(tmp_path: Path) -> None:
    import yaml

    def resolved(cli: Any) -> dict[str, Any]:
        return _flat(yaml.safe_load(cli.parser.dump(cli.config, format="yaml", skip_none=False)))

    skewed = resolved(_cli(FULL, SKEWED, tmp_path=tmp_path))
    cli = _cli(FULL, SKEWED, REPLICATE, tmp_path=tmp_path)
    over = resolved(cli)
    changed = {k for k in set(skewed) | set(over) if skewed.get(k) != over.get(k)}
    assert changed == {"trainer.val_check_interval", "data.init_args.world.val_size"}
    assert (over["trainer.val_check_interval"], over["data.init_args.world.val_size"]) == (5, 178)
    dm = cli.datamodule
    dm.setup("fit")
    # 40% / 40% of 178: 71 hard, 71 easy (the validation pool holds 71 easy questions), 36 middle
    assert dict(share_counts(dm.val_records)) == {"hard": 71, "easy": 71, "middle": 36}
    assert not {r.id for r in dm.train_records} & {r.id for r in dm.val_records}


def test_one_more_validation_question_is_refused_naming_the_easy_share(tmp_path: Path) -> None:
    cli = _cli(FULL, SKEWED, REPLICATE, tmp_path=tmp_path, extra=("--data.init_args.world.val_size", "179"))
    with pytest.raises(ValueError, match="easy: need 72, the pool has 71"):
        cli.datamodule.setup("fit")
