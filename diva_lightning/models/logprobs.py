"""Per-token log-probabilities (and entropy) of completions under a Qwen2(.5)-VL policy.

Prompt + completion are re-scored in one forward pass. ``mm_token_type_ids`` is extended with zeros
over the completion (text), the attention mask with ones (HF ``generate`` also attends to the pads
that follow an early EOS, so the masked tails see the same context; their values are masked anyway),
and images are repeated per response when several responses share a prompt.

Memory. With a real vocabulary (V = 151,936) the float32 logits of a micro-batch, ``[N, T, V]``, dwarf
everything else the scoring step holds (40 x 1024 tokens: 25 GB per copy), and the plain formula holds several
copies (the upcast, the tempered logits, the softmax for the entropy, their gradients). So the logits are never
built: ``lm_head`` is applied to ``chunk_tokens`` hidden states at a time inside :class:`_ChunkedTokenScores`,
which keeps only the per-token log-normaliser and entropy, and recomputes each chunk's logits in backward.
Peak extra memory is then about two float32 ``[chunk_tokens, V]`` buffers (``benchmarks/logprob_memory.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from diva_lightning.models.attention import varlen_calls
from diva_lightning.models.vision import dummy_image, num_image_tokens

_ROW_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


def images_per_row(
    prompt_inputs: Mapping[str, torch.Tensor], *, image_token_id: int, merge_size: int
) -> torch.Tensor:
    """[P] number of images in each prompt row, recovered from the pad counts and the grids.

    Images are stored row after row (``PolicyBundle.encode`` order), so walking the per-image token
    counts against each row's ``<|image_pad|>`` count assigns them.
    """
    input_ids = prompt_inputs["input_ids"]
    counts = torch.zeros(input_ids.shape[0], dtype=torch.long)
    if "image_grid_thw" not in prompt_inputs:
        return counts
    per_image = num_image_tokens(prompt_inputs["image_grid_thw"], merge_size).tolist()
    pads_per_row = (input_ids == image_token_id).sum(dim=1).tolist()
    k = 0
    for row, pads in enumerate(pads_per_row):
        while pads > 0:
            if k >= len(per_image):
                raise ValueError(f"row {row} has more image pads than the grids account for")
            pads -= per_image[k]
            counts[row] += 1
            k += 1
        if pads < 0:
            raise ValueError(f"row {row}: image pad count does not match the image grids")
    if k != len(per_image):
        raise ValueError(f"{len(per_image)} images but only {k} are placed in the prompts")
    return counts


def repeat_prompt_inputs(
    prompt_inputs: Mapping[str, torch.Tensor],
    prompt_index: torch.Tensor,
    *,
    image_token_id: int,
    merge_size: int,
) -> dict[str, torch.Tensor]:
    """Select prompt rows ``prompt_index`` (repeats allowed), with the matching images.

    Args:
        prompt_inputs: ``PolicyBundle.encode`` output for P prompts.
        prompt_index: [N] long, values in [0, P).
    Returns:
        the same keys for N rows; pixel_values / image_grid_thw hold each selected row's images in row order.
    """
    index = prompt_index.to(prompt_inputs["input_ids"].device)
    out = {k: prompt_inputs[k][index] for k in _ROW_KEYS if k in prompt_inputs}
    if "image_grid_thw" not in prompt_inputs:
        return out
    grid = prompt_inputs["image_grid_thw"]
    n_img = images_per_row(prompt_inputs, image_token_id=image_token_id, merge_size=merge_size)
    patches = grid.prod(dim=-1).cpu()  # [K] patch rows of pixel_values per image
    img_start = torch.cumsum(n_img, 0) - n_img  # first image of each row
    patch_start = torch.cumsum(patches, 0) - patches  # first pixel_values row of each image
    img_ids: list[int] = []
    for row in index.tolist():
        img_ids.extend(range(int(img_start[row]), int(img_start[row] + n_img[row])))
    if not img_ids:
        return out
    patch_rows = torch.cat(
        [torch.arange(int(patch_start[k]), int(patch_start[k] + patches[k])) for k in img_ids]
    )
    out["pixel_values"] = prompt_inputs["pixel_values"][patch_rows.to(grid.device)]
    out["image_grid_thw"] = grid[torch.tensor(img_ids, device=grid.device)]
    return out


# Tokens whose logits are materialised at once: at V = 151,936 two float32 [256, V] buffers are 0.3 GB, and
# a [256, H] x [H, V] matmul is still large enough to run at full speed.
DEFAULT_CHUNK_TOKENS = 256


def _tempered_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float
                     ) -> torch.Tensor:
    """[c, H] -> [c, V] logits / temperature in float32 (float64 stays float64), the matmul in the precision the
    model's lm_head would use."""
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # a new tensor: in-place below is safe
    return logits if temperature == 1.0 else logits.div_(temperature)


class _ChunkedTokenScores(torch.autograd.Function):
    """Per-token log p(target) and entropy of softmax((hidden @ weight.T + bias) / temperature), chunk by chunk.

    Forward keeps only log Z and H per token ([N] each); backward recomputes each chunk's logits and applies
    d log p / dz = onehot(target) - p and dH / dz = -p * (z - E_p[z]) (with E_p[z] = log Z - H), so at most one
    chunk's logits (two float32 [c, V] buffers) are alive at any time, in forward and in backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,  # [N, H]
        weight: torch.Tensor,  # [V, H]
        bias: torch.Tensor | None,  # [V]
        targets: torch.Tensor,  # [N] long
        temperature: float,
        with_entropy: bool,
        chunk_tokens: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        logz = torch.empty(n, dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        logp = torch.empty_like(logz)
        entropy = torch.empty_like(logz) if with_entropy else logz.new_empty(0)
        for lo in range(0, n, chunk_tokens):
            rows = slice(lo, min(n, lo + chunk_tokens))
            z = _tempered_logits(hidden[rows], weight, bias, temperature)  # [c, V]
            zmax = z.amax(dim=-1, keepdim=True)
            p = torch.sub(z, zmax).exp_()  # [c, V] unnormalised probabilities
            total = p.sum(dim=-1, keepdim=True)
            logz[rows] = (zmax + total.log()).squeeze(-1)  # = torch.logsumexp(z, -1), same operations
            logp[rows] = z.gather(-1, targets[rows, None]).squeeze(-1) - logz[rows]
            if with_entropy:
                entropy[rows] = logz[rows] - p.div_(total).mul_(z).sum(dim=-1)  # H = log Z - E_p[z]
            del z, p
        ctx.save_for_backward(hidden, weight, bias, targets, logz, entropy)
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))  # type: ignore[attr-defined]
        ctx.temperature = temperature  # type: ignore[attr-defined]
        ctx.chunk_tokens = chunk_tokens  # type: ignore[attr-defined]
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets, logz, entropy = ctx.saved_tensors  # type: ignore[attr-defined]
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        use_entropy = grad_entropy is not None and entropy.numel() > 0
        none = (None,) * 4  # targets, temperature, with_entropy, chunk_tokens
        if grad_logp is None and not use_entropy:
            return (None, None, None, *none)
        temperature: float = ctx.temperature  # type: ignore[attr-defined]
        chunk: int = ctx.chunk_tokens  # type: ignore[attr-defined]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # float32 accumulators: summing per-chunk products in bf16 would lose what one big matmul keeps
        acc = logz.dtype
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_bias else None
        device, autocast_on, autocast_dtype = ctx.autocast  # type: ignore[attr-defined]
        n = hidden.shape[0]
        with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_on):  # the forward's precision
            for lo in range(0, n, chunk):
                rows = slice(lo, min(n, lo + chunk))
                h = hidden[rows]
                z = _tempered_logits(h, weight, bias, temperature)  # [c, V]
                p = torch.sub(z, logz[rows, None]).exp_()  # [c, V] softmax
                if use_entropy:
                    assert grad_entropy is not None
                    # z := g_H * p * (z - E_p[z]); the entropy part of dL/dz is its negative
                    z.sub_((logz[rows] - entropy[rows])[:, None]).mul_(p).mul_(grad_entropy[rows, None])
                if grad_logp is not None:
                    g_logp = grad_logp[rows, None]
                    grad_z = p.mul_(-g_logp).scatter_add_(1, targets[rows, None], g_logp)  # g * (onehot - p)
                    if use_entropy:
                        grad_z.sub_(z)
                else:
                    grad_z = z.neg_()
                del p, z
                grad_z.div_(temperature)  # [c, V] dL/dlogits
                if grad_hidden is not None:
                    grad_hidden[rows] = torch.mm(grad_z.to(weight.dtype), weight).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight.addmm_(grad_z.t(), h.to(acc))  # in-place ops escape autocast: float32
                if grad_bias is not None:
                    grad_bias += grad_z.sum(dim=0)
                del grad_z
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            *none,
        )


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of ``targets`` (and entropy) under softmax((hidden @ weight.T + bias) / temperature).

    Equal to ``log_softmax(F.linear(hidden, weight, bias).float() / temperature).gather(targets)`` and to the
    entropy of that distribution, values and gradients, without ever holding the ``[..., V]`` logits of more than
    ``chunk_tokens`` tokens (see :class:`_ChunkedTokenScores`).

    Args:
        hidden: [..., H] final hidden states (the ``lm_head`` input).
        weight: [V, H] output-layer weight; ``bias``: [V] or None.
        targets: [...] long token ids in [0, V).
        temperature: the logits are divided by it (> 0).
        with_entropy: also return the per-token entropy of the tempered distribution.
        chunk_tokens: tokens scored at once (None: all of them in one chunk).
    Returns:
        logp [...] float32 and entropy [...] float32 or None.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1 or None, got {chunk_tokens}")
    if hidden.shape[:-1] != targets.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"shapes do not match: hidden {tuple(hidden.shape)}, targets {tuple(targets.shape)}, "
            f"weight {tuple(weight.shape)} (expected hidden [..., H], targets [...], weight [V, H])"
        )
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # [N, H]; a copy when hidden is a strided slice (small)
    flat_targets = targets.reshape(-1).long()
    step = max(1, flat_targets.numel() if chunk_tokens is None else chunk_tokens)
    logp, entropy = _ChunkedTokenScores.apply(
        flat_hidden, weight, bias, flat_targets, float(temperature), with_entropy, step
    )
    return logp.view(targets.shape), entropy.view(targets.shape) if with_entropy else None


def _score(
    model: PreTrainedModel,
    prompt_inputs: Mapping[str, torch.Tensor],
    completion_ids: torch.Tensor,
    *,
    temperature: float,
    with_entropy: bool,
    chunk_tokens: int | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward over rows already aligned with ``completion_ids`` [n, T] -> ([n, T], [n, T] | None).

    The model runs its own ``forward`` (so whatever wraps it runs as usual: FSDP2 unshards the output layer,
    PEFT applies adapters), while a pre-hook on its output layer scores the hidden states with
    :func:`token_logprobs` and hands the layer zero positions: the forward's own logits are ``[n, 0, V]``.
    Calling the inner ``model.model`` and ``lm_head`` directly would skip the root module's FSDP2 hooks.
    """
    t = completion_ids.shape[1]
    inputs = dict(prompt_inputs)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], completion_ids], dim=1)
    ones = torch.ones_like(completion_ids, dtype=inputs["attention_mask"].dtype)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], ones], dim=1)
    if "mm_token_type_ids" in inputs:
        mm = inputs["mm_token_type_ids"]
        inputs["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(completion_ids, dtype=mm.dtype)], dim=1)
    lm_head = model.get_output_embeddings()
    if not isinstance(lm_head, torch.nn.Linear):
        raise TypeError(
            "chunked scoring applies the output layer's weight itself and needs an nn.Linear; "
            f"{type(model).__name__}.get_output_embeddings() is {type(lm_head).__name__} "
            "(an adapter on lm_head is not supported: leave lm_head out of the LoRA target modules)"
        )
    scores: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def score_hidden(module: torch.nn.Linear, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        hidden = args[0]  # [n, T + 1, H]: positions L-1 .. L+T-1 (logits_to_keep below)
        # positions L-1 .. L+T-2 predict the T completion tokens; the last position predicts nothing we score
        scores.append(token_logprobs(
            hidden[:, :-1], module.weight, completion_ids, bias=module.bias, temperature=temperature,
            with_entropy=with_entropy, chunk_tokens=chunk_tokens,
        ))
        return (hidden[:, :0],)

    handle = lm_head.register_forward_pre_hook(score_hidden)
    try:
        # skipping the prompt's other positions also skips their lm_head (the largest matmul at 152k vocabulary)
        model(**inputs, use_cache=False, logits_to_keep=t + 1)
    finally:
        handle.remove()
    if len(scores) != 1:
        raise RuntimeError(f"expected the output layer to run once per forward, it ran {len(scores)} times")
    return scores[0]


def completion_logprobs(
    model: PreTrainedModel,
    prompt_inputs: Mapping[str, torch.Tensor],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    prompt_index: torch.Tensor | None = None,
    chunk_size: int | None = None,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of completion tokens under ``model`` at ``temperature``.

    Args:
        model: a Qwen2(.5)-VL ``...ForConditionalGeneration``.
        prompt_inputs: ``PolicyBundle.encode`` output (left-padded), P rows.
        completion_ids: [N, T] long, sampled continuations.
        completion_mask: [N, T], 1 on real completion tokens (through the first EOS), 0 after.
        temperature: logits are divided by it, as in sampling, so ratios compare like with like.
        with_entropy: also return the per-token entropy of the tempered distribution.
        prompt_index: [N] prompt row of each completion; default ``arange(N)`` (requires N == P).
        chunk_size: score at most this many rows per forward (memory bound; results are identical).
        chunk_tokens: within a forward, build the vocabulary logits of at most this many tokens at once
            (memory bound, forward and backward; results are identical; None: all tokens of the forward).
    Returns:
        logp [N, T] float32 and entropy [N, T] float32 or None; both 0 where ``completion_mask`` is 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = completion_ids.shape[0]
    if prompt_index is None:
        if prompt_inputs["input_ids"].shape[0] != n:
            raise ValueError("prompt_index is required when completions and prompts differ in number")
        prompt_index = torch.arange(n)
    cfg = model.config
    merge = int(cfg.vision_config.spatial_merge_size)
    step = n if chunk_size is None else max(1, chunk_size)
    logps: list[torch.Tensor] = []
    ents: list[torch.Tensor] = []
    for lo in range(0, n, step):
        rows = slice(lo, min(n, lo + step))
        chunk_inputs = repeat_prompt_inputs(
            prompt_inputs, prompt_index[rows], image_token_id=int(cfg.image_token_id), merge_size=merge
        )
        logp, ent = _score(
            model, chunk_inputs, completion_ids[rows], temperature=temperature, with_entropy=with_entropy,
            chunk_tokens=chunk_tokens,
        )
        logps.append(logp)
        if ent is not None:
            ents.append(ent)
    mask = completion_mask.to(dtype=torch.float32, device=logps[0].device)
    logp_all = torch.cat(logps, dim=0) * mask
    entropy_all = torch.cat(ents, dim=0) * mask if with_entropy else None
    return logp_all, entropy_all


# ------------------------------------------------------------------------------------------ padding-free scoring
def vl_model(model: torch.nn.Module) -> torch.nn.Module:
    """The inner Qwen2(.5)-VL ``...Model`` (vision tower + language model) of a policy, PEFT-wrapped or not."""
    for module in model.modules():
        if hasattr(module, "get_rope_index") and hasattr(module, "get_image_features"):
            return module
    raise TypeError(f"{type(model).__name__} has no Qwen2-VL model inside (get_rope_index / get_image_features)")


def encode_images(model: torch.nn.Module, pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None,
                  *, dummy: bool = False) -> list[torch.Tensor]:
    """Vision features of each image ([tokens_k, H] each), one vision-tower call for all of them.

    With no images and ``dummy``, the tower runs on :func:`diva_lightning.models.vision.dummy_image` and returns
    ``[]``-equivalent features of zero rows that still depend on every vision weight: a sharded (FSDP2) tower is
    then gathered, and its gradient reduced, on every rank whatever the rank's batch holds.
    """
    inner = vl_model(model)
    if pixel_values is None or image_grid_thw is None or image_grid_thw.shape[0] == 0:
        if not dummy:
            return []
        pixel_values, image_grid_thw = dummy_image(model.config, device=_device_of(inner))
        out = inner.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        return [torch.cat(list(out.pooler_output), dim=0)[:0]]  # no rows, but attached to the tower's graph
    out = inner.get_image_features(pixel_values, image_grid_thw, return_dict=True)
    return list(out.pooler_output)


def _device_of(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


@dataclass
class StepImages:
    """Vision features of every image of a batch of prompts, encoded once and shared by all their responses.

    For scoring passes without gradient (old / reference log-probs): each distinct image runs through the vision
    tower once per step, not once per response nor once per micro-batch.
    """

    features: list[torch.Tensor]  # per image, in ``prompt_inputs`` order; [] for a text-only batch


def _prompt_tokens(prompt_inputs: Mapping[str, torch.Tensor], p: int) -> torch.Tensor:
    ids = prompt_inputs["input_ids"][p]
    return ids[prompt_inputs["attention_mask"][p].bool()]


def _prompt_positions(inner: torch.nn.Module, ids: torch.Tensor, grids: torch.Tensor | None, image_token_id: int
                      ) -> torch.Tensor:
    """[3, P] M-RoPE positions of one unpadded prompt (text-only prompts: 0 .. P-1 on all three axes)."""
    if grids is None or grids.shape[0] == 0:
        return torch.arange(ids.shape[0], device=ids.device).expand(3, -1)
    mm = (ids == image_token_id).to(torch.int32)
    pos, _ = inner.get_rope_index(ids[None], mm[None], image_grid_thw=grids)
    return pos[:, 0]


def sequence_lengths(prompt_inputs: Mapping[str, torch.Tensor], prompt_index: torch.Tensor,
                     completion_mask: torch.Tensor) -> torch.Tensor:
    """[N] real tokens of each response's sequence (its prompt without padding + its completion through EOS)."""
    prompt_len = prompt_inputs["attention_mask"].sum(dim=1).to(prompt_index.device)
    return prompt_len[prompt_index] + completion_mask.sum(dim=1).to(prompt_index.device)


def packed_logprobs(
    model: PreTrainedModel,
    prompt_inputs: Mapping[str, torch.Tensor],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    prompt_index: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
    pack: bool = True,
    pack_width: int | None = None,
    sync_vision: bool = False,
    images: StepImages | None = None,
    share_prompt: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`completion_logprobs` of the responses in one forward, without a padded position.

    Each response's sequence is its prompt's real tokens followed by its completion's real tokens (through the
    first stop token; the post-EOS pads are not in the forward at all). With ``pack`` the sequences are concatenated
    into one row, kept apart by packed position ids (``[4, 1, L]``: text positions, then the three M-RoPE axes; the
    attention implementation masks across sequences: block-causal under sdpa/eager, ``cu_seqlens`` under
    flash-attention); without it they are right-padded to the longest of this call. The vision tower runs once per
    *distinct* image of the call (the G responses of a prompt share its features), or not at all when ``images``
    holds the step's features already; the output layer runs only on the positions that predict a completion token.

    Args:
        prompt_index: [N] prompt row of each response.
        completion_mask: [N, T] 1 on the first k_i positions of each row, 0 after (the rollout's form).
        pack_width: with ``pack``, a row holds sequences up to ``max(pack_width, longest sequence)`` tokens; None:
            the longest sequence (sdpa / eager build a dense mask per row and attend across it, so a row longer
            than that costs attention; flash-attention's varlen kernels do not: pass a large width, e.g. the token
            budget, to pack everything into one row with no padded position at all).
        sync_vision: run the vision tower on a dummy image (contributing zero) when this call has no image, so that
            every rank of a sharded model runs the same units in the same order (FSDP2 collectives).
        images: the step's vision features (:class:`StepImages`, no-grad passes), or None to encode here.
        share_prompt: compute each prompt once for all its responses in the call (``[prompt + completion 1]
            [completion 2] ...``, ``models.attention``): needs the model loaded with ``attn_implementation=
            "sdpa_varlen"`` (checked: a forward that did not go through it raises) and ``pack``.
    Returns:
        logp [N, T] float32 and entropy [N, T] or None, 0 where ``completion_mask`` is 0 (as completion_logprobs).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if share_prompt and not pack:
        raise ValueError("share_prompt needs pack=True (a prompt and its completions share one row)")
    n, t = completion_ids.shape
    device = completion_ids.device
    lengths = completion_mask.sum(dim=1).long()
    mask = completion_mask.bool()
    if not torch.equal(mask, torch.arange(t, device=device)[None] < lengths[:, None]):
        raise ValueError("completion_mask must be 1 on a prefix of each row (through the first stop token), 0 after")
    cfg = model.config
    image_token_id, merge = int(cfg.image_token_id), int(cfg.vision_config.spatial_merge_size)
    inner = vl_model(model)
    n_img = images_per_row(prompt_inputs, image_token_id=image_token_id, merge_size=merge)
    grid = prompt_inputs.get("image_grid_thw")
    img_start = (torch.cumsum(n_img, 0) - n_img).tolist()
    rows = prompt_index.tolist()
    distinct = list(dict.fromkeys(rows))

    # vision: each distinct image of this call once (or the step's features)
    feats: dict[int, torch.Tensor] = {}  # global image index -> [tokens, H]
    wanted = [k for p in distinct for k in range(img_start[p], img_start[p] + int(n_img[p]))]
    anchor: torch.Tensor | None = None  # the dummy's zero-row features: keeps the tower in the graph
    if images is not None:
        feats = {k: images.features[k] for k in wanted}
    elif wanted:
        assert grid is not None
        patches = grid.prod(dim=-1).cpu()
        patch_start = (torch.cumsum(patches, 0) - patches).tolist()
        pix_rows = torch.cat([torch.arange(patch_start[k], patch_start[k] + int(patches[k])) for k in wanted])
        enc = encode_images(model, prompt_inputs["pixel_values"][pix_rows.to(grid.device)],
                            grid[torch.tensor(wanted, device=grid.device)])
        feats = dict(zip(wanted, enc))
    elif sync_vision:
        anchor = encode_images(model, None, None, dummy=True)[0]

    # units packed whole into rows: a response (prompt + completion), or with `share_prompt` a prompt and all its
    # completions (models.attention reads each completion's text positions, starting at the prompt's length, as
    # "attend to the prompt first"); with each unit, the offsets in it of the positions predicting each response
    prompt_ids = {p: _prompt_tokens(prompt_inputs, p) for p in distinct}
    prompt_pos = {}
    for p in distinct:
        g = None if grid is None or n_img[p] == 0 else grid[img_start[p] : img_start[p] + int(n_img[p])]
        prompt_pos[p] = _prompt_positions(inner, prompt_ids[p], g, image_token_id).to(device)
    placed: dict[int, list[int]] = {}  # prompt -> its responses in one unit (shared) or one unit each
    for i, p in enumerate(rows):
        placed.setdefault(p, []).append(i)
    unit_members = list(placed.items()) if share_prompt else [(p, [i]) for i, p in enumerate(rows)]
    units = [_unit(p, group, prompt_ids[p].to(device), prompt_pos[p], completion_ids, lengths)
             for p, group in unit_members]
    sizes = [int(u.ids.shape[0]) for u in units]
    width = max(max(sizes), pack_width or 0) if pack else max(sizes)
    # rows of the forward: packed, each row holds whole units up to `width` tokens (first fit, longest first;
    # by default the longest unit's length, so that attention, quadratic in a row's length under sdpa's dense
    # mask, stays that of the longest unit); unpacked, one unit per row, right-padded
    bins = _first_fit(sizes, width) if pack else [[u] for u in range(len(units))]
    width = max(sum(sizes[u] for u in group) for group in bins)  # no row is longer than its units
    ids = torch.full((len(bins), width), int(getattr(cfg, "pad_token_id", None) or 0), dtype=torch.long,
                     device=device)
    pos = torch.zeros((4, len(bins), width), dtype=torch.long, device=device)
    att = torch.zeros((len(bins), width), dtype=torch.long, device=device)
    keep: list[torch.Tensor | None] = [None] * n  # flat positions predicting each response's tokens
    row_images, row_grids = [], []
    for b, group in enumerate(bins):
        used = 0
        for u in group:
            unit, size = units[u], sizes[u]
            ids[b, used : used + size], pos[:, b, used : used + size] = unit.ids, unit.positions
            att[b, used : used + size] = 1
            for i, offsets in unit.scored:
                keep[i] = b * width + used + offsets
            used += size
            p = unit.prompt
            for j in range(img_start[p], img_start[p] + int(n_img[p])):  # image features in the forward's order
                row_images.append(feats[j])
                row_grids.append(grid[j])  # type: ignore[index]
        # the tail is a segment of its own (positions restart at 0): it attends to nothing real and is never scored
        pos[0, b, used:] = torch.arange(width - used, device=device)
    flat_keep = torch.cat([k for k in keep if k is not None])
    targets = completion_ids[mask]  # [K] in row-major order: row 0's tokens first, as flat_keep

    inputs: dict[str, object] = {"input_ids": ids}
    if pack:  # text positions first: transformers builds the block-causal mask (cu_seqlens under flash-attention)
        inputs["position_ids"] = pos
    else:
        inputs.update(attention_mask=att, position_ids=pos[1:])
    if row_images:
        embeds = torch.cat(row_images, dim=0)
        inputs["image_grid_thw"] = torch.stack(row_grids)
    elif anchor is not None:
        embeds = anchor
    else:
        embeds = None
    if embeds is not None:
        inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=(embeds,))}

    lm_head = model.get_output_embeddings()
    if not isinstance(lm_head, torch.nn.Linear):
        raise TypeError(f"chunked scoring needs an nn.Linear output layer, got {type(lm_head).__name__}")
    scores: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def score_hidden(module: torch.nn.Linear, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        hidden = args[0]
        picked = hidden.reshape(-1, hidden.shape[-1])[flat_keep]  # [K, H]: only the scored positions
        scores.append(token_logprobs(picked, module.weight, targets, bias=module.bias, temperature=temperature,
                                     with_entropy=with_entropy, chunk_tokens=chunk_tokens))
        return (hidden[:, :0],)

    handle = lm_head.register_forward_pre_hook(score_hidden)
    try:
        with varlen_calls() as served:
            # packed: keep only the scored positions before the output layer; padded: all (gathered in the hook)
            model(**inputs, use_cache=False, logits_to_keep=0)
    finally:
        handle.remove()
    if share_prompt and not served:
        raise ValueError("share_prompt needs the policy loaded with attn_implementation='sdpa_varlen': under "
                         "another attention implementation the completions would not see their prompt")
    if len(scores) != 1:
        raise RuntimeError(f"expected the output layer to run once per forward, it ran {len(scores)} times")
    logp_flat, ent_flat = scores[0]
    logp = torch.zeros((n, t), dtype=logp_flat.dtype, device=device).masked_scatter(mask, logp_flat)
    ent = None
    if ent_flat is not None:
        ent = torch.zeros((n, t), dtype=ent_flat.dtype, device=device).masked_scatter(mask, ent_flat)
    return logp, ent


@dataclass
class _Unit:
    """Tokens placed whole in one packed row: a prompt and one or more of its completions."""

    prompt: int
    ids: torch.Tensor  # [S]
    positions: torch.Tensor  # [4, S]: text positions, then the three M-RoPE axes
    scored: list[tuple[int, torch.Tensor]]  # (response, offsets in the unit of the positions predicting its tokens)


def _unit(p: int, responses: list[int], prompt_ids: torch.Tensor, prompt_pos: torch.Tensor,
          completion_ids: torch.Tensor, lengths: torch.Tensor) -> _Unit:
    """Prompt ``p`` followed by the completions of ``responses``. Each completion's text positions start at the
    prompt's length P (after the first, whose positions follow on, they mark a continuation: ``models.attention``)
    and its M-RoPE positions after the prompt's; its first token is predicted by the prompt's last position."""
    device = prompt_ids.device
    plen = int(prompt_ids.shape[0])
    start = prompt_pos.max() + 1 if prompt_pos.numel() else torch.tensor(0, device=device)
    ids, text, rope = [prompt_ids], [torch.arange(plen, device=device)], [prompt_pos]
    scored = []
    used = plen
    for i in responses:
        k = int(lengths[i])
        ar = torch.arange(k, device=device)
        ids.append(completion_ids[i, :k])
        text.append(plen + ar)
        rope.append((start + ar).expand(3, -1))
        scored.append((i, torch.cat([torch.tensor([plen - 1], device=device), used + ar[:-1]])[:k]))
        used += k
    return _Unit(prompt=p, ids=torch.cat(ids), positions=torch.cat([torch.cat(text)[None], torch.cat(rope, dim=1)]),
                 scored=scored)


def _first_fit(sizes: list[int], width: int) -> list[list[int]]:
    """Sequence indices per row: longest first, each into the first row with room left (first-fit decreasing)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        for r, room in enumerate(free):
            if room >= sizes[i]:
                rows[r].append(i)
                free[r] -= sizes[i]
                break
        else:
            rows.append([i])
            free.append(width - sizes[i])
    return rows


def step_images(model: torch.nn.Module, prompt_inputs: Mapping[str, torch.Tensor], *, sync_vision: bool = False
                ) -> StepImages:
    """Encode every image of the step's prompts once (no-grad scoring passes share it: :class:`StepImages`)."""
    feats = encode_images(model, prompt_inputs.get("pixel_values"), prompt_inputs.get("image_grid_thw"),
                          dummy=sync_vision)
    has_images = "image_grid_thw" in prompt_inputs and prompt_inputs["image_grid_thw"].shape[0] > 0
    return StepImages(features=feats if has_images else [])
