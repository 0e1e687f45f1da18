"""Typed settings of the training system, each with a `check()` that lists its problems.

`DivaGRPOModule` collects every `check()` when it is built and raises once with all problems (issue 11 item 8:
nothing is validated late, after a rollout). String choices are typed with `diva_lightning.core.choices`' aliases,
so jsonargparse refuses an unknown word while parsing, and checked with its validator for code that builds these
directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diva_lightning.core.choices import (
    Agg,
    AttnImplementation,
    FilterMetric,
    IsLevel,
    IsMode,
    KlType,
    OnError,
    RatioLevel,
    SamplingUnit,
    WeightsDtype,
    choice_problems,
)

FORMER_WORDS: dict[str, dict[str, str]] = {"prompt_overflow": {"error": "raise"}}
"""Words an option used to take -> the word it takes now (option name as it ends the key). `prompt_overflow: error`
became `raise`, the word of every option that decides what a bad input gets (`data.on_error` too)."""


def former_word(option: str, value: object) -> str | None:
    """The message for a word ``option`` no longer takes but used to (None for any other value)."""
    now = FORMER_WORDS.get(option.rsplit(".", 1)[-1], {}).get(value) if isinstance(value, str) else None
    return f"{option}: {value!r} is now called {now!r} (the word every option for a bad input uses)" if now else None


@dataclass
class LossConfig:
    """Policy-loss settings (design.md section 6)."""

    clip_low: float = 0.2
    """Lower PPO clip (ratio >= 1 - clip_low)."""
    clip_high: float = 0.3
    """Upper PPO clip (ratio <= 1 + clip_high); official 0.3."""
    dual_clip: float | None = 3.0
    """Dual-clip constant c for negative advantages; null turns it off."""
    agg: Agg = "token_mean"
    """token_mean | seq_mean_token_mean | seq_mean_token_sum_norm (Dr.GRPO: constant = max_new_tokens)."""
    ratio_level: RatioLevel = "token"
    """token (PPO/GRPO) | sequence (GSPO: one length-normalised ratio per response)."""
    mask_truncated_completions: bool = False
    """Responses that hit the token budget get no gradient (TRL's mask_truncated_completions)."""
    kl_coef: float = 0.0
    """Weight of the KL to the frozen reference policy (0 = no reference model is loaded)."""
    kl_type: KlType = "k3"
    """k1 | k3 (low_var_kl)."""
    entropy_coef: float = 0.0
    """Entropy bonus weight."""

    def check(self) -> list[str]:
        problems = choice_problems("loss.agg", self.agg, Agg) + choice_problems("loss.kl_type", self.kl_type, KlType)
        problems += choice_problems("loss.ratio_level", self.ratio_level, RatioLevel)
        if not 0 <= self.clip_low < 1 or self.clip_high < 0:
            problems.append(f"loss.clip_low must be in [0, 1) and clip_high >= 0, got {self.clip_low}, "
                            f"{self.clip_high}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            problems.append(f"loss.dual_clip must be > 1 or null, got {self.dual_clip}")
        if self.kl_coef < 0 or self.entropy_coef < 0:
            problems.append(f"loss.kl_coef and entropy_coef must be >= 0, got {self.kl_coef}, {self.entropy_coef}")
        return problems


@dataclass
class SamplingConfig:
    """Decoding settings for rollouts or evaluation."""

    temperature: float = 1.0
    """Sampling temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int = 64
    """Maximum response length in tokens."""
    num_samples: int = 1
    """Evaluation only: responses per question, accuracy averaged over them (mean@k; needs temperature > 0 when
    above 1). Rollouts use ``num_generations`` instead, so ``train_sampling`` must leave it at 1."""

    def check(self, name: str) -> list[str]:
        problems = []
        if self.temperature < 0:
            problems.append(f"{name}.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"{name}.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            problems.append(f"{name}.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_samples < 1:
            problems.append(f"{name}.num_samples must be >= 1, got {self.num_samples}")
        elif self.num_samples > 1 and self.temperature <= 0:
            problems.append(f"{name}.num_samples > 1 needs temperature > 0 (greedy answers are all the same)")
        return problems


@dataclass
class CorrectionConfig:
    """Importance-sampling correction between the engine's and the trainer's log-probs (TRL's names)."""

    level: IsLevel = "token"
    """token | sequence."""
    mode: IsMode = "truncate"
    """truncate (weights capped at `cap`) | mask (tokens or sequences above `cap` get weight 0)."""
    cap: float = 3.0
    """Cap C of the ratio pi_trainer / pi_engine."""

    def check(self) -> list[str]:
        problems = choice_problems("rollout_correction.level", self.level, IsLevel)
        problems += choice_problems("rollout_correction.mode", self.mode, IsMode)
        if self.cap <= 1:
            problems.append(f"rollout_correction.cap must be > 1, got {self.cap}")
        return problems


@dataclass
class DynamicSamplingConfig:
    """DAPO-style dynamic sampling: zero-spread groups are dropped and more questions are drawn until the batch
    is full again (the baseline users pick instead of variants; verl's filter_groups, EasyR1's online filtering).
    """

    max_draws: int = 3
    """Rollout rounds per step at most, the first included: the resample budget. Every rank draws as often as the
    rank that needs most; when the budget runs out, zero-spread groups fill the batch (no gradient, same size)."""
    unit: SamplingUnit = "prompt"
    """prompt (a prompt's G responses, GRPO's group) | family (a question and its variants, DIVA's global group)."""
    metric: FilterMetric = "reward"
    """What must differ within a unit: reward (the shaped reward, as DAPO) | accuracy (the accuracy term alone, as
    MM-Eureka's online filter: a group that is all wrong but mixed in format is dropped)."""

    def check(self) -> list[str]:
        problems = choice_problems("dynamic_sampling.unit", self.unit, SamplingUnit)
        problems += choice_problems("dynamic_sampling.metric", self.metric, FilterMetric)
        if self.max_draws < 1:
            problems.append(f"dynamic_sampling.max_draws must be >= 1, got {self.max_draws}")
        return problems


@dataclass
class LoraConfig:
    """LoRA adapters through PEFT (the vision tower excluded by default, as EasyR1 and verl do)."""

    rank: int = 64
    """Adapter rank r."""
    alpha: int = 128
    """Scaling alpha (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names (last path component) that get adapters."""
    include_vision: bool = False
    """Also adapt the vision tower's modules of those names."""

    def check(self) -> list[str]:
        problems = []
        if self.rank < 1 or self.alpha <= 0:
            problems.append(f"lora.rank must be >= 1 and lora.alpha > 0, got {self.rank}, {self.alpha}")
        if not self.target_modules:
            problems.append("lora.target_modules is empty")
        if not 0 <= self.dropout < 1:
            problems.append(f"lora.dropout must be in [0, 1), got {self.dropout}")
        return problems


@dataclass
class PolicyConfig:
    """How the policy is loaded and what of it trains: the real-model scale knobs (issue 10 item 3).

    Pixel budgets: null means "auto": the authors' 262,144 .. 1,048,576 pixels per image for a checkpoint whose
    processor allows more than 1,048,576 (a stock Qwen2.5-VL processor allows 12.8 MP per image); a checkpoint
    with a smaller budget of its own keeps it (the embedded policy: 56x56 .. 112x112).
    """

    dtype: WeightsDtype = "float32"
    """Weights dtype: float32 | bfloat16 (bfloat16 trains through float32 master copies in the optimizer)."""
    attn_implementation: AttnImplementation | None = None
    """sdpa | sdpa_varlen | eager | flash_attention_2/3 (need the flash-attn package) | null: sdpa_varlen with
    padding_free (one packed row per forward, attention within each sequence: docs/update.md), else transformers'
    choice. Under flash-attention and sdpa_varlen a forward packs all its sequences into one row (no padded
    position); under sdpa and eager into rows of the longest sequence (their mask is dense across a row)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (decoder layers and vision blocks)."""
    freeze_vision_tower: bool = False
    """Train the language model only: the vision tower's weights get no gradient and no optimizer state."""
    lora: LoraConfig | None = None
    """LoRA adapters (PEFT); null trains the full weights. The KL reference is then the base (adapter off)."""
    min_pixels: int | None = None
    """Smallest image area after resizing (null: auto, see above)."""
    max_pixels: int | None = None
    """Largest image area after resizing (null: auto, see above)."""
    max_prompt_length: int | None = None
    """Longest prompt in tokens (images included); null: the context length minus max_new_tokens."""
    prompt_overflow: OnError = "raise"
    """raise (all too-long questions listed before training) | skip (dropped and counted, with a warning)."""
    padding_free: bool = True
    """Score responses without padding: each forward packs its responses' real tokens (prompt + completion through
    EOS) into one row with packed position ids, and encodes each distinct image once (docs/update.md). false: the
    earlier padded path (prompts left-padded to the batch, completions to the rollout's longest)."""
    share_prompt: bool | None = None
    """Compute each prompt once for all its responses in a forward (the responses attend to the one prompt:
    docs/update.md 4); equal log-probs and gradients. Needs sdpa_varlen; null: on under sdpa_varlen."""
    max_tokens_per_micro_batch: int | None = None
    """Token budget of one forward/backward (verl's ppo_max_token_len_per_gpu): micro-batches are filled with whole
    responses up to this many real tokens, and every rank runs as many as the rank that needs most; null: the
    micro-batches are micro_batch_size responses. Needs padding_free (a padded forward costs more than its tokens)."""

    def attention(self) -> str | None:
        """The attention implementation the policy is loaded with (``attn_implementation`` resolved)."""
        if self.attn_implementation is None and self.padding_free:
            return "sdpa_varlen"  # models.attention.VARLEN
        return self.attn_implementation

    def shares_prompt(self) -> bool:
        """Whether scoring computes each prompt once for its responses (``share_prompt`` resolved: only the
        padding-free path under sdpa_varlen can; ``check`` refuses a ``true`` elsewhere)."""
        if not self.padding_free:
            return False
        return self.share_prompt if self.share_prompt is not None else self.attention() == "sdpa_varlen"

    def check(self) -> list[str]:
        problems = choice_problems("policy_config.dtype", self.dtype, WeightsDtype)
        if self.share_prompt and (self.attention() != "sdpa_varlen" or not self.padding_free):
            problems.append(f"policy_config.share_prompt needs attn_implementation sdpa_varlen (or null with "
                            f"padding_free), got {self.attn_implementation} with padding_free {self.padding_free}: "
                            f"only it lets a response attend to a prompt computed once")
        problems += choice_problems("policy_config.attn_implementation", self.attn_implementation,
                                    AttnImplementation, optional=True)
        renamed = former_word("policy_config.prompt_overflow", self.prompt_overflow)
        problems += [renamed] if renamed else choice_problems("policy_config.prompt_overflow", self.prompt_overflow,
                                                              OnError)
        if self.min_pixels is not None and self.min_pixels < 1:
            problems.append(f"policy_config.min_pixels must be >= 1, got {self.min_pixels}")
        if self.max_pixels is not None and self.max_pixels < max(1, self.min_pixels or 1):
            problems.append(f"policy_config.max_pixels must be >= min_pixels, got {self.max_pixels}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            problems.append(f"policy_config.max_prompt_length must be >= 1, got {self.max_prompt_length}")
        if self.max_tokens_per_micro_batch is not None:
            if self.max_tokens_per_micro_batch < 1:
                problems.append(f"policy_config.max_tokens_per_micro_batch must be >= 1 or null, got "
                                f"{self.max_tokens_per_micro_batch}")
            if not self.padding_free:
                problems.append("policy_config.max_tokens_per_micro_batch needs padding_free: true")
        if self.lora is not None:
            problems += self.lora.check()
        return problems
