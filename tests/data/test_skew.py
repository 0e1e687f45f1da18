"""The difficulty-skew knob: composition by measured success rate (pure), the table file, the data module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diva_lightning.data.skew import SkewConfig, SuccessTable, compose, share_counts
from diva_lightning.data.sources import WorldConfig
from diva_lightning.data.world import generate_world
from diva_lightning.models.embedded import SHIPPED_DIR
from diva_lightning.system.datamodule import DivaDataModule

REPO = Path(__file__).resolve().parents[2]


def _table(pool, rates: list[int], samples: int = 10, pools: dict[str, int] | None = None) -> SuccessTable:
    return SuccessTable("0" * 64, 0, pools or {"train": len(pool)}, samples,
                        {r.id: k for r, k in zip(pool, rates)})


def test_hand_worked_composition() -> None:
    pool = generate_world(10, seed=0, split="train")
    # successes out of 10: p = 0, 0.05 is impossible at n=10 -> 0 is hard; 10 (p=1) is easy; the rest middle
    rates = [0, 10, 5, 0, 10, 3, 0, 10, 7, 1]
    table = _table(pool, rates)
    out = compose(pool, table, 5, SkewConfig(hard=0.4, easy=0.4), seed=0)
    # 5 x 0.4 = 2 hard, 2 easy, 1 middle; pool order kept
    assert [r.meta["skew"] for r in out].count("hard") == 2
    assert share_counts(out) == {"hard": 2, "easy": 2, "middle": 1}
    ids = [r.id for r in out]
    assert ids == sorted(ids)
    for r in out:
        k = rates[[p.id for p in pool].index(r.id)]
        assert r.meta["base_success"] == k / 10
        assert r.meta["skew"] == ("hard" if k == 0 else "easy" if k == 10 else "middle")
    # p = 1/10 is not < 0.1: middle, so the hard share has exactly the three zeros
    assert table.share_of(pool[9].id, SkewConfig()) == "middle"


def test_counts_never_exceed_the_split() -> None:
    # 0.5 x 3 rounds to 2 for both shares: easy gets the 1 left, the middle none
    assert SkewConfig(hard=0.5, easy=0.5).counts(3) == {"hard": 2, "easy": 1, "middle": 0}
    assert SkewConfig(hard=0.4, easy=0.4).counts(160) == {"hard": 64, "easy": 64, "middle": 32}


def test_shortfall_names_the_share() -> None:
    pool = generate_world(8, seed=0, split="train")
    table = _table(pool, [0, 5, 5, 5, 5, 5, 5, 10])
    with pytest.raises(ValueError, match=r"hard: need 3, the pool has 1.*easy: need 3, the pool has 1"):
        compose(pool, table, 8, SkewConfig(hard=0.4, easy=0.4), seed=0)


def test_pool_record_missing_from_table() -> None:
    pool = generate_world(4, seed=0, split="train")
    table = _table(pool[:3], [0, 0, 0])
    with pytest.raises(KeyError, match=pool[3].id):
        compose(pool, table, 2, SkewConfig(hard=0.5), seed=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"hard": 0.7, "easy": 0.5}, "exceeds 1"), ({"hard": -0.1}, "must lie in"),
    ({"hard_below": 0.95, "easy_above": 0.9}, "hard_below"),
])
def test_bad_config(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SkewConfig(**kwargs)


@settings(max_examples=40, deadline=None)
@given(rates=st.lists(st.integers(0, 16), min_size=20, max_size=20), hard=st.floats(0, 0.5), easy=st.floats(0, 0.5),
       n=st.integers(1, 20), seed=st.integers(0, 5))
def test_properties(rates: list[int], hard: float, easy: float, n: int, seed: int) -> None:
    pool = _POOL
    table = _table(pool, rates, samples=16)
    skew = SkewConfig(hard=hard, easy=easy)
    need = skew.counts(n)
    try:
        out = compose(pool, table, n, skew, seed=seed)
    except ValueError:
        have = {s: sum(table.share_of(r.id, skew) == s for r in pool) for s in need}
        assert any(have[s] < need[s] for s in need)  # refused only when the pool really falls short
        return
    assert len(out) == n and len({r.id for r in out}) == n
    assert dict(share_counts(out)) == need  # exactly the asked shares
    for r in out:  # every tag agrees with the table
        assert r.meta["skew"] == table.share_of(r.id, skew)
    assert out == compose(pool, table, n, skew, seed=seed)  # deterministic


_POOL = generate_world(20, seed=3, split="train")


def test_table_round_trip_and_bad_files(tmp_path: Path) -> None:
    pool = generate_world(4, seed=0, split="train")
    table = _table(pool, [0, 3, 10, 7])
    table.save(tmp_path / "t.json")
    assert SuccessTable.load(tmp_path / "t.json") == table
    body = json.loads((tmp_path / "t.json").read_text())
    body["successes"][pool[0].id] = 11
    (tmp_path / "bad.json").write_text(json.dumps(body))
    with pytest.raises(ValueError, match=f"bad rows: \\['{pool[0].id}'\\]"):
        SuccessTable.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="missing"):
        SuccessTable.load(tmp_path / "none.json")


def test_datamodule_composes_world_splits_by_the_table(tmp_path: Path) -> None:
    train = generate_world(40, seed=0, split="train")
    val = generate_world(20, seed=0, split="val")
    rates = [0 if i % 3 == 0 else 16 if i % 3 == 1 else 8 for i in range(60)]
    table = SuccessTable("0" * 64, 0, {"train": 40, "val": 20}, 16,
                         {r.id: k for r, k in zip(train + val, rates)})
    table.save(tmp_path / "success.json")
    skew = SkewConfig(hard=0.5, easy=0.25, table=str(tmp_path / "success.json"))
    dm = DivaDataModule(world=WorldConfig(train_size=12, val_size=8, test_size=4, skew=skew), questions_per_step=2,
                        num_generations=2)
    dm.setup("fit")
    assert dict(share_counts(dm.train_records)) == {"hard": 6, "easy": 3, "middle": 3}
    assert dict(share_counts(dm.val_records)) == {"hard": 4, "easy": 2, "middle": 2}
    # the test split is not in the table: an error naming it, not an unskewed split
    with pytest.raises(ValueError, match="split 'test'"):
        dm.setup("test")


def test_shipped_table_matches_the_shipped_weights_and_skewed_yaml_composes_from_it() -> None:
    import yaml

    from diva_lightning.data.success import table_for, weights_digest

    table = table_for("embedded")  # refuses a table measured on other weights
    assert table.weights_sha256 == weights_digest(SHIPPED_DIR)
    assert table.samples == 16 and set(table.pools) == {"train", "val", "test"}
    world = yaml.safe_load((REPO / "experiments" / "skewed.yaml").read_text())["data"]["init_args"]["world"]
    cfg = WorldConfig(**{**world, "skew": SkewConfig(**world["skew"])})
    dm = DivaDataModule(world=cfg, questions_per_step=8, num_generations=2)
    dm.setup("fit")
    dm.setup("test")
    for records, n in ((dm.train_records, cfg.train_size), (dm.val_records, cfg.val_size),
                       (dm.test_records, cfg.test_size)):
        assert dict(share_counts(records)) == cfg.skew.counts(n)
        for r in records:  # every tag is the table's verdict on that question
            p = table.rate(r.id)
            assert r.meta["skew"] == ("hard" if p < 0.1 else "easy" if p > 0.9 else "middle")
    assert not {r.id for r in dm.train_records} & {r.id for r in dm.val_records}


def test_a_table_of_other_weights_is_refused(tmp_path: Path) -> None:
    from diva_lightning.data import success as success_table

    body = json.loads((SHIPPED_DIR / "success.json").read_text())
    body["weights_sha256"] = "f" * 64
    fake = tmp_path / "success.json"
    fake.write_text(json.dumps(body))
    # a table handed over by path is taken as it is; the shipped name is checked against the shipped weights
    assert SuccessTable.load(fake).weights_sha256 == "f" * 64
    with pytest.raises(ValueError, match="measured on weights ffffffffffff"):
        success_table.check_table(SuccessTable.load(fake), SHIPPED_DIR, str(fake))


def test_a_table_measured_at_another_temperature_is_refused(tmp_path: Path) -> None:
    """Shares measured at one rollout temperature are not hard or easy at another: check_temperature refuses the
    mismatch naming both, and a table written before the setting was recorded counts as temperature 1."""
    from diva_lightning.data.success import check_temperature, table_for

    shipped = table_for("embedded")
    assert shipped.settings["temperature"] == 0.5  # experiments/skewed.yaml's rollout temperature
    assert check_temperature(shipped, 0.5, "here") is shipped
    with pytest.raises(ValueError, match=r"here: the success table was measured at temperature 0.5, but the rollouts "
                                         r"sample at 1: set model.init_args.train_sampling.temperature: 0.5"):
        check_temperature(shipped, 1.0, "here")
    legacy = SuccessTable("0" * 64, 0, {"train": 1}, 16, {"x": 3})  # no settings: measured at 1.0
    assert check_temperature(legacy, 1.0, "here") is legacy
    with pytest.raises(ValueError, match="measured at temperature 1, but the rollouts sample at 0.5"):
        check_temperature(legacy, 0.5, "here")


def test_fit_on_the_skewed_world_at_another_temperature_stops_before_training(tmp_path: Path) -> None:
    """Through the real CLI: skewed.yaml with the paper's rollout temperature (1.0) is refused before the policy
    loads or a step runs; nothing is written under the run folder."""
    from diva_lightning.cli import run_cli

    with pytest.raises(ValueError, match="measured at temperature 0.5, but the rollouts sample at 1"):
        run_cli(["fit", "--config", str(REPO / "experiments/full.yaml"), "--config",
                 str(REPO / "experiments/skewed.yaml"), "--model.init_args.train_sampling.temperature", "1.0",
                 "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.max_steps", "1"])
    assert not list((tmp_path / "runs").rglob("metrics.csv"))


def test_success_histograms_by_hand_and_the_plot_command(tmp_path: Path) -> None:
    """The histogram of right answers (counted by hand) and the comparison plot the docs show, drawn from files
    without measuring anything."""
    from tools import success_table as st_mod

    pool = generate_world(5, seed=0, split="train")
    t1 = _table(pool, [0, 0, 3, 4, 4], samples=4)
    t1.settings["temperature"] = 1.0
    assert st_mod.histogram(t1) == [2, 0, 0, 1, 2]
    t1.save(tmp_path / "t1.json")
    out = st_mod.main(["--plot_tables", str(tmp_path / "t1.json"), "embedded", "--plot", str(tmp_path / "h.png")])
    assert out == tmp_path / "h.png" and out.stat().st_size > 0
    with pytest.raises(SystemExit):
        st_mod.main(["--plot_tables", "embedded"])  # nowhere to draw: a usage error, nothing measured
