"""The real-model scale knobs and the policy path, each on the tiny model (issue 10 item 3, issue 11 item 7)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from diva_lightning.cli import run_cli
from diva_lightning.data.schema import decode_image
from diva_lightning.data.world import generate_world
from diva_lightning.models.logprobs import completion_logprobs
from diva_lightning.models.policy import load_policy
from diva_lightning.system.module import AUTHORS_PIXELS, DivaGRPOModule
from diva_lightning.training.config import PolicyConfig
from diva_lightning.training.sharding import check_strategy
from tests.helpers.logp_probe import probe_inputs
from tests.test_module import small_args


def _logp(model: torch.nn.Module, bundle: object) -> torch.Tensor:
    inputs, completion, mask = probe_inputs(bundle)
    return completion_logprobs(model, inputs, completion, mask)[0]


# ------------------------------------------------------------------------------------------------- policy path
def test_missing_local_policy_is_an_error_and_nothing_is_built(tmp_path: Path) -> None:
    """Pointing `policy` at an absent Qwen2.5-VL-7B folder used to build the toy model into it and train it."""
    target = tmp_path / "models" / "Qwen2.5-VL-7B-Instruct"
    with pytest.raises(FileNotFoundError, match=r"directory at .*Qwen2.5-VL-7B-Instruct \(not tried as a hub id"):
        run_cli(small_args(str(target), tmp_path / "runs"))
    assert not target.exists() and not (tmp_path / "models").exists()


def test_hub_shaped_policy_says_it_was_tried_on_the_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no local folder named like the id
    with pytest.raises(FileNotFoundError, match="no local directory .* and loading it as a hub id failed"):
        load_policy("diva-lightning-tests/no-such-model")


def test_home_is_expanded(tiny_policy_dir: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    shutil.copytree(tiny_policy_dir, tmp_path / "policy")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_policy("~/policy").model.config.model_type == "qwen2_5_vl"


# ---------------------------------------------------------------------------------------------------- strategy
def test_fsdp1_is_refused_and_names_the_overlay() -> None:
    assert "experiments/fsdp.yaml" in check_strategy(FSDPStrategy())[0]
    assert check_strategy(DDPStrategy()) == []


# ------------------------------------------------------------------------------------------------ attention
def test_eager_and_sdpa_attention_agree(tiny_policy_dir: str) -> None:
    eager, sdpa = (load_policy(tiny_policy_dir, attn_implementation=a) for a in ("eager", "sdpa"))
    torch.testing.assert_close(_logp(eager.model, eager), _logp(sdpa.model, sdpa), atol=1e-5, rtol=1e-5)


def test_flash_attention_without_the_package_is_a_clear_error(tiny_policy_dir: str) -> None:
    with pytest.raises(ImportError, match="needs the flash-attn package"):
        load_policy(tiny_policy_dir, attn_implementation="flash_attention_2")


# ------------------------------------------------------------------------------------------ memory knobs
def test_gradient_checkpointing_gives_the_same_gradients(tiny_policy_dir: str) -> None:
    grads = []
    for checkpointing in (False, True):
        bundle = load_policy(tiny_policy_dir)
        model = bundle.model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        _logp(model, bundle).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


def _policy_after_one_step(tiny_policy_dir: str, tmp_path: Path, *extra: str) -> tuple[DivaGRPOModule, dict]:
    before = {n: p.detach().clone() for n, p in load_policy(tiny_policy_dir).model.named_parameters()}
    cli = run_cli(small_args(tiny_policy_dir, tmp_path, *extra, steps=1))
    return cli.model, before


def test_frozen_vision_tower_does_not_move(tiny_policy_dir: str, tmp_path: Path) -> None:
    module, before = _policy_after_one_step(tiny_policy_dir, tmp_path,
                                            "--model.init_args.policy_config.freeze_vision_tower", "true")
    after = dict(module.policy.named_parameters())
    vision = [n for n in after if ".visual." in f".{n}"]
    assert vision and all(not after[n].requires_grad and torch.equal(after[n], before[n]) for n in vision)
    assert any(not torch.equal(after[n], before[n]) for n in after if n not in vision)
    trained = {id(p) for group in module.optimizers().param_groups for p in group["params"]}
    assert not any(id(after[n]) in trained for n in vision)  # no optimizer state for frozen weights


def test_lora_trains_adapters_only_and_exports_merged(tiny_policy_dir: str, tmp_path: Path) -> None:
    lora = ["--model.init_args.policy_config.lora.rank", "4", "--model.init_args.policy_config.lora.alpha", "8"]
    module, before = _policy_after_one_step(tiny_policy_dir, tmp_path, *lora)
    names = [n for n, p in module.policy.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert not any("visual" in n for n in names)  # the vision tower gets no adapters by default
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in module.policy.named_parameters()
               if "lora_B" in n)  # B starts at zero: it moved
    out = module.export_policy(tmp_path / "exported")
    exported = load_policy(out)
    assert set(dict(exported.model.named_parameters())) == set(before)  # plain checkpoint, base names
    module.policy.eval()
    with torch.no_grad():
        live = _logp(module.policy, module.bundle)
        merged = _logp(exported.model, exported)
    torch.testing.assert_close(merged, live, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------------- pixel budget
def test_pixel_budget_auto_and_configured(tiny_policy_dir: str, tmp_path: Path) -> None:
    stock = tmp_path / "stock"
    shutil.copytree(tiny_policy_dir, stock)
    cfg_file = stock / "preprocessor_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["size"] = {"shortest_edge": 3136, "longest_edge": 12_845_056}  # a stock Qwen2.5-VL processor
    cfg_file.write_text(json.dumps(cfg))
    for path, expected in ((tiny_policy_dir, None), (str(stock), AUTHORS_PIXELS)):
        module = DivaGRPOModule(policy=path)
        module.configure_model()
        spec = module.bundle.vision_spec
        own = load_policy(path).vision_spec
        assert (spec.min_pixels, spec.max_pixels) == (expected or (own.min_pixels, own.max_pixels))
    module = DivaGRPOModule(policy=str(stock), policy_config=PolicyConfig(min_pixels=3136, max_pixels=50_176))
    module.configure_model()
    assert (module.bundle.vision_spec.min_pixels, module.bundle.vision_spec.max_pixels) == (3136, 50_176)
    image = decode_image(generate_world(1, seed=0, split="val")[0].images[0])  # 112 x 112
    enc = module.bundle.encode(["<image> q"], [[torch.nn.functional.interpolate(image[None], 448)[0]]])
    assert int(enc["image_grid_thw"].prod()) * 14 * 14 <= 50_176  # resized into the configured budget
