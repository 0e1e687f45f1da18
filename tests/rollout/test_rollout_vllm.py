"""The vLLM engine's pure parts, on CPU (vLLM itself is CUDA-only and cannot be installed here).

Tested: the install hint, the `vllm.LLM` arguments per process, prompt building (padding stripped, image pads
collapsed, images at the trained pixels), parameter-name mapping, and turning completions into a Rollout with
the engine's log-probs. The weight iterator over a sharded module is tested in tests/training/test_fsdp.py.
Not tested anywhere: vLLM's own generation, sleep mode and load_weights.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from diva_lightning.data.schema import decode_image
from diva_lightning.data.world import generate_world
from diva_lightning.models.policy import PolicyBundle, load_policy
from diva_lightning.models.vision import preprocess_images
from diva_lightning.rollout.vllm import VLLMEngine, rollout_from_completions, vllm_weight_name


@pytest.fixture(scope="module")
def bundle(tiny_policy_dir: str) -> PolicyBundle:
    return load_policy(tiny_policy_dir)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_missing_vllm_gives_install_hint(bundle: PolicyBundle) -> None:
    engine = VLLMEngine()  # built at config time without vLLM: nothing is created yet
    with pytest.raises(ImportError, match=r"pip install 'diva-lightning\[vllm\]' on a CUDA machine"):
        engine.setup(bundle, rank=0, world_size=1, seed=0, sharded=False)


def test_llm_arguments_per_process(bundle: PolicyBundle) -> None:
    args = VLLMEngine(llm_kwargs={"enforce_eager": True}).llm_arguments(bundle, world_size=2, seed=7)
    assert args["model"] == bundle.source and args["seed"] == 7 and args["enforce_eager"] is True
    assert args["distributed_executor_backend"] == "external_launcher"
    assert args["logprobs_mode"] == "processed_logprobs" and args["enable_sleep_mode"] is True
    spec = bundle.vision_spec
    assert args["mm_processor_kwargs"] == {"min_pixels": spec.min_pixels, "max_pixels": spec.max_pixels}
    assert "distributed_executor_backend" not in VLLMEngine().llm_arguments(bundle, world_size=1, seed=0)


def test_names_map_to_the_original_checkpoint(bundle: PolicyBundle) -> None:
    names = {vllm_weight_name(n) for n, _ in bundle.model.named_parameters()}
    assert "model.layers.0.self_attn.q_proj.weight" in names and "visual.blocks.0.attn.qkv.weight" in names
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    assert not any(n.startswith(("model.language_model.", "model.visual.")) for n in names)


def test_prompts_strip_padding_and_keep_the_trained_pixels(bundle: PolicyBundle) -> None:
    records = generate_world(2, seed=0, split="val")
    images = [decode_image(r.images[0]) for r in records]
    inputs = bundle.encode([records[0].problem, records[1].problem + " and more words"], [[i] for i in images])
    prompts = VLLMEngine().prompts(bundle, inputs)
    pad = bundle.image_token_id
    for k, prompt in enumerate(prompts):
        ids = prompt["prompt_token_ids"]
        assert ids.count(pad) == 1 and int(bundle.tokenizer.pad_token_id) not in ids[:1]
        real = inputs["input_ids"][k][inputs["attention_mask"][k].bool()].tolist()
        assert [t for t in real if t != pad] == [t for t in ids if t != pad]
        pil = prompt["multi_modal_data"]["image"][0]
        back = torch.tensor(list(pil.getdata()), dtype=torch.float32).T.reshape(3, pil.height, pil.width) / 255
        # re-encoding the handed-over image gives the trainer's pixels (up to the uint8 rounding)
        pv, grid = preprocess_images([back], bundle.vision_spec)
        assert grid.tolist() == [inputs["image_grid_thw"][k].tolist()]


def test_completions_become_a_rollout_with_engine_logps(bundle: PolicyBundle) -> None:
    stop = bundle.stop_token_ids[0]
    out = [
        SimpleNamespace(token_ids=[5, 6, stop], text="ab", logprobs=[{5: SimpleNamespace(logprob=-0.5)},
                        {6: SimpleNamespace(logprob=-1.0)}, {stop: SimpleNamespace(logprob=-0.1)}]),
        SimpleNamespace(token_ids=[7], text="c", logprobs=[{7: SimpleNamespace(logprob=-2.0)}]),
    ]
    roll = rollout_from_completions(bundle, [(0, out[0]), (1, out[1])], device=torch.device("cpu"))
    assert roll.prompt_index.tolist() == [0, 1] and roll.texts == ["ab", "c"]
    assert roll.completion_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert roll.finished.tolist() == [True, False]  # the second hit the budget
    torch.testing.assert_close(roll.old_logp, torch.tensor([[-0.5, -1.0, -0.1], [-2.0, 0.0, 0.0]]))
