"""The vLLM engine's pure parts, on CPU, without vLLM (the real engine: tests/vllm, `make test-vllm`).

Tested: the install hint, the `vllm.LLM` arguments and the environment vLLM receives per process and device (what
only differs on a GPU: bfloat16, sleep mode, the launcher's ranks), the per-response sampling seeds, the streamed
LoRA merge, prompt building (padding stripped, image pads collapsed, images at the trained pixels), parameter-name
mapping, and turning completions into a Rollout with the engine's log-probs.
"""

from __future__ import annotations

import copy
import importlib.util
from types import SimpleNamespace

import pytest
import torch

from diva_lightning.data.schema import decode_image
from diva_lightning.data.world import generate_world
from diva_lightning.models.lora import apply_lora, lora_scale, merge_lora_state_dict
from diva_lightning.models.policy import PolicyBundle
from diva_lightning.models.vision import preprocess_images
from diva_lightning.rollout.vllm import (
    VLLMEngine,
    merge_lora_stream,
    rollout_from_completions,
    vllm_environment,
    vllm_weight_name,
    vllm_weights,
)
from diva_lightning.training.sharding import full_state_dict, iter_full_tensors


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_missing_vllm_gives_install_hint(bundle: PolicyBundle) -> None:
    engine = VLLMEngine()  # built at config time without vLLM: nothing is created yet
    with pytest.raises(ImportError, match=r"pip install 'diva-lightning\[vllm\]' on a CUDA machine"):
        engine.setup(bundle, rank=0, world_size=1, seed=0, sharded=False)


def test_llm_arguments_per_process_and_device(bundle: PolicyBundle) -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 3)  # a CUDA device object needs no CUDA
    args = VLLMEngine(llm_kwargs={"enforce_eager": True}).llm_arguments(bundle, world_size=2, seed=7, device=cpu)
    assert args["model"] == bundle.source and args["seed"] == 7 and args["enforce_eager"] is True
    assert args["distributed_executor_backend"] == "external_launcher"  # one in-process engine per rank
    assert args["logprobs_mode"] == "processed_logprobs"
    assert args["enable_sleep_mode"] is False and args["dtype"] == "float32"  # chosen from the device: CPU
    spec = bundle.vision_spec
    assert args["mm_processor_kwargs"] == {"min_pixels": spec.min_pixels, "max_pixels": spec.max_pixels}
    assert VLLMEngine().llm_arguments(bundle, world_size=1, seed=0, device=cpu)["distributed_executor_backend"] == "uni"
    # on a GPU: bfloat16 whatever the master weights are (this policy's are float32), sleep mode on
    assert next(bundle.model.parameters()).dtype == torch.float32
    on_gpu = VLLMEngine().llm_arguments(bundle, world_size=8, seed=0, device=gpu)
    assert on_gpu["dtype"] == "bfloat16" and on_gpu["enable_sleep_mode"] is True
    assert VLLMEngine(dtype="float32", sleep_mode=False).llm_arguments(bundle, world_size=1, seed=0, device=gpu
                                                                       )["dtype"] == "float32"
    with pytest.raises(ValueError, match="sleep_mode needs CUDA"):
        VLLMEngine(sleep_mode=True).llm_arguments(bundle, world_size=1, seed=0, device=cpu)
    with pytest.raises(ValueError, match="dtype must be one of"):
        VLLMEngine(dtype="fp8")


def test_environment_from_the_strategy_under_each_launcher() -> None:
    group = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    # Lightning's own launcher: LOCAL_RANK, NODE_RANK, WORLD_SIZE, no RANK (vLLM's external_launcher reads it)
    lightning = {**group, "LOCAL_RANK": "3", "NODE_RANK": "1", "WORLD_SIZE": "16"}
    env = vllm_environment(device=torch.device("cuda", 3), rank=11, world_size=16, cpu_kv_cache_gib=1,
                           environ=lightning)
    assert env == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "RANK": "11", "LOCAL_RANK": "3", "WORLD_SIZE": "16"}
    # srun: SLURM_* only (one GPU visible per task: the device index is 0); torchrun: all set, the same values
    srun = {**group, "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}
    env = vllm_environment(device=torch.device("cuda", 0), rank=5, world_size=8, cpu_kv_cache_gib=1, environ=srun)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("5", "0", "8")
    torchrun = {**group, "RANK": "2", "LOCAL_RANK": "2", "WORLD_SIZE": "4"}
    env = vllm_environment(device=torch.device("cuda", 2), rank=2, world_size=4, cpu_kv_cache_gib=1, environ=torchrun)
    assert (env["RANK"], env["LOCAL_RANK"]) == ("2", "2") and "VLLM_CPU_KVCACHE_SPACE" not in env
    # one process: in-process too, nothing distributed; on CPU the KV cache is sized unless the caller did
    assert vllm_environment(device=torch.device("cpu"), rank=0, world_size=1, cpu_kv_cache_gib=2, environ={}) == {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2"}
    assert "VLLM_CPU_KVCACHE_SPACE" not in vllm_environment(
        device=torch.device("cpu"), rank=0, world_size=1, cpu_kv_cache_gib=2, environ={"VLLM_CPU_KVCACHE_SPACE": "4"})
    with pytest.raises(RuntimeError, match="MASTER_ADDR and MASTER_PORT unset"):
        vllm_environment(device=torch.device("cuda", 0), rank=0, world_size=2, cpu_kv_cache_gib=1, environ={})


def test_every_response_gets_its_own_seed() -> None:
    engine = VLLMEngine()
    kw = {"num_prompts": 4, "num_generations": 3, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8,
          "do_sample": True, "stop_token_ids": [1], "vision_token_ids": [5, 6]}
    rank0 = [p["seed"] for p in engine.sampling_params(seed=9, **kw)]
    engine.rank = 1
    rank1 = [p["seed"] for p in engine.sampling_params(seed=9, **kw)]
    assert len(set(rank0 + rank1)) == 24  # no two prompts, responses or ranks share a stream
    assert rank1 == [p["seed"] for p in engine.sampling_params(seed=9, **kw)]  # reproducible
    assert all(p["seed"] is None for p in engine.sampling_params(seed=None, **kw))
    params = engine.sampling_params(seed=9, **{**kw, "do_sample": False})
    assert params[0]["temperature"] == 0.0 and params[0]["n"] == 1 and params[0]["logit_bias"] == {5: -100.0, 6: -100.0}


def test_lora_is_merged_layer_by_layer_like_the_state_dict(bundle: PolicyBundle) -> None:
    model = apply_lora(copy.deepcopy(bundle.model), rank=4, alpha=8, dropout=0.0,
                       target_modules=["q_proj", "v_proj"], include_vision=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # PEFT starts B at zero: make the merge matter
    whole = merge_lora_state_dict(full_state_dict(model), scale=lora_scale(model))
    streamed = dict(merge_lora_stream(iter_full_tensors(model), scale=lora_scale(model)))
    assert streamed.keys() == whole.keys()
    for key in whole:
        torch.testing.assert_close(streamed[key], whole[key], rtol=0, atol=0)
    changed = [k for k in whole if not torch.equal(whole[k], bundle.model.state_dict()[k])]
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    names = {n for n, _ in vllm_weights(model)}
    assert "model.layers.0.self_attn.q_proj.weight" in names and not any("lora" in n for n in names)


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
