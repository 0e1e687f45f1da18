"""Precision: every supported weight dtype / trainer precision pair takes an lr 1e-6 AdamW step; others refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diva_lightning.cli import run_cli
from diva_lightning.data.schema import decode_image
from diva_lightning.data.world import generate_world
from diva_lightning.models.logprobs import completion_logprobs
from diva_lightning.models.policy import load_policy
from diva_lightning.training.precision import SUPPORTED, MasterWeightAdamW, check_precision
from tests.test_module import small_args


def _loss(bundle: object) -> torch.Tensor:
    records = generate_world(2, seed=0, split="train")
    inputs = bundle.encode([r.problem for r in records], [[decode_image(r.images[0])] for r in records])  # type: ignore[attr-defined]
    ids = torch.randint(3, 200, (2, 5), generator=torch.Generator().manual_seed(0))
    logp, _ = completion_logprobs(bundle.model, inputs, ids, torch.ones_like(ids))  # type: ignore[attr-defined]
    return -logp.mean()


def _moved_share(before: list[torch.Tensor], after: list[torch.Tensor], grads: list[torch.Tensor]) -> float:
    """Share of the entries with a non-zero gradient whose value changed."""
    live = changed = 0
    for b, a, g in zip(before, after, grads):
        nz = g != 0
        live += int(nz.sum())
        changed += int((a.float() != b.float())[nz].sum())
    return changed / live


@pytest.mark.parametrize("setting", ["float32/32-true", "float32/bf16-mixed", "bfloat16/master"])
def test_one_adamw_step_at_lr_1e6_moves_the_weights(tiny_policy_dir: str, setting: str) -> None:
    dtype, mode = setting.split("/")
    bundle = load_policy(tiny_policy_dir, dtype=dtype)
    params = [p for p in bundle.model.parameters() if p.requires_grad]
    opt = MasterWeightAdamW(params, lr=1e-6) if mode == "master" else torch.optim.AdamW(params, lr=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16-mixed"):
        loss = _loss(bundle)
    loss.backward()
    grads = [p.grad.detach().float().clone() for p in params]
    trained = opt.masters if isinstance(opt, MasterWeightAdamW) else params  # the weights the optimizer keeps
    before = [t.detach().clone() for t in trained]
    opt.step()
    assert _moved_share(before, [t.detach() for t in trained], grads) > 0.99


def test_bf16_weights_without_master_copies_barely_move(tiny_policy_dir: str) -> None:
    """The fault this module fixes: AdamW at lr 1e-6 on bf16 weights rounds almost every update away."""
    bundle = load_policy(tiny_policy_dir, dtype="bfloat16")
    params = list(bundle.model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-6)
    _loss(bundle).backward()
    grads = [p.grad.detach().float().clone() for p in params]
    before = [p.detach().clone() for p in params]
    opt.step()
    assert _moved_share(before, [p.detach() for p in params], grads) < 0.1


def test_master_weights_survive_a_state_dict_round_trip() -> None:
    w = torch.nn.Parameter(torch.full((4,), 0.02, dtype=torch.bfloat16))
    start = w.detach().float().clone()
    opt = MasterWeightAdamW([w], lr=1e-6)
    for _ in range(3):
        w.grad = torch.ones_like(w)
        opt.step()
    assert torch.equal(w.float(), start)  # bf16 cannot show a 3e-6 change (its ulp at 0.02 is 1.2e-4)
    torch.testing.assert_close(opt.masters[0], start - 3e-6, atol=1e-9, rtol=0)  # the float32 master did move
    w2 = torch.nn.Parameter(torch.full((4,), 0.02, dtype=torch.bfloat16))
    fresh = MasterWeightAdamW([w2], lr=1e-6)
    fresh.load_state_dict(opt.state_dict())
    assert torch.equal(fresh.masters[0], opt.masters[0])


def test_precision_table() -> None:
    for dtype, precision in SUPPORTED:
        assert check_precision(dtype, precision, sharded=False) == []
    assert "16-mixed is not supported: use" in check_precision("float32", "16-mixed", sharded=False)[0]
    assert "bf16-true is not supported" in check_precision("float32", "bf16-true", sharded=False)[0]
    assert "under FSDP2 keep policy_config.dtype float32" in check_precision("bfloat16", "32-true", sharded=True)[0]


def test_unsupported_precision_is_refused_before_any_rollout(tiny_policy_dir: str, tmp_path: Path) -> None:
    args = small_args(tiny_policy_dir, tmp_path, "--trainer.precision", "bf16-true")
    with pytest.raises(ValueError, match="dtype float32 with trainer.precision bf16-true is not supported"):
        run_cli(args)
    assert not list(tmp_path.rglob("metrics.csv"))  # nothing trained, nothing logged
