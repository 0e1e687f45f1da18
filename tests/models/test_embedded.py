"""The shipped base policy: its files match their recorded sha256, it loads, and a damaged copy is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from diva_lightning.models.embedded import (
    CHECKSUMS,
    EMBEDDED,
    SHIPPED_DIR,
    checkpoint_files,
    verify_checksums,
    write_checksums,
)
from diva_lightning.models.policy import load_policy, resolve_policy_source


def test_shipped_files_match_their_recorded_hashes() -> None:
    sums = verify_checksums(SHIPPED_DIR)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(sums)
    assert set(sums) == {p.name for p in checkpoint_files(SHIPPED_DIR)}
    # the build record names the same weights, and the recipe that built them is beside them
    info = json.loads((SHIPPED_DIR / "build_info.json").read_text())
    assert info["weights_sha256"] == sums["model.safetensors"]
    assert "max_steps" in (SHIPPED_DIR / "recipe.yaml").read_text()


def test_embedded_loads_the_shipped_folder() -> None:
    assert resolve_policy_source(EMBEDDED) == (str(SHIPPED_DIR), True)
    bundle = load_policy(EMBEDDED)
    assert sum(p.numel() for p in bundle.model.parameters()) < 2_000_000  # the tiny policy, not a download


def _copy(tmp_path: Path) -> Path:
    out = tmp_path / "policy"
    shutil.copytree(SHIPPED_DIR, out)
    return out


def test_a_damaged_copy_is_refused_naming_the_file(tmp_path: Path) -> None:
    copy = _copy(tmp_path)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    (copy / "extra.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"model\.safetensors: sha256 .* but SHA256SUMS records .*extra\.bin: not "
                                         r"listed"):
        verify_checksums(copy)


def test_checksums_written_cover_the_checkpoint(tmp_path: Path) -> None:
    copy = _copy(tmp_path)
    (copy / CHECKSUMS).unlink()
    with pytest.raises(FileNotFoundError, match="SHA256SUMS"):
        verify_checksums(copy)
    assert write_checksums(copy) == verify_checksums(SHIPPED_DIR)


def test_make_run_config_trains_from_the_shipped_policy_without_a_warmup(tmp_path: Path) -> None:
    """`make run`'s config names `policy: embedded`: one round trains from the shipped weights, builds nothing, and on
    the skewed world logs validation accuracy per share."""
    import csv

    from diva_lightning.cli import run_cli

    repo = SHIPPED_DIR.parents[2]
    had_artifacts = (repo / "artifacts").exists()
    cli = run_cli([
        "fit", "--config", str(repo / "experiments/full.yaml"), "--config", str(repo / "experiments/skewed.yaml"),
        "--trainer.max_steps", "1", "--trainer.val_check_interval", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--data.init_args.questions_per_step", "2",
        "--model.init_args.num_generations", "2", "--model.init_args.train_sampling.max_new_tokens", "8",
        "--model.init_args.val_sampling.max_new_tokens", "8",
    ])
    assert cli.model.policy_path == EMBEDDED
    assert (repo / "artifacts").exists() == had_artifacts  # no warm-up build
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/accuracy_hard")]
    assert rows and {"val/accuracy_easy", "val/accuracy_middle", "val/accuracy"} <= set(rows[-1])
