"""Policy builders: the tiny offline Qwen2.5-VL, checkpoint loading, input encoding and log-probs."""

from diva_lightning.models.logprobs import completion_logprobs, repeat_prompt_inputs
from diva_lightning.models.policy import PolicyBundle, load_policy
from diva_lightning.models.prompt import R1_INSTRUCTION, PromptConfig
from diva_lightning.models.tiny import TinyDims, build_tiny_policy
from diva_lightning.models.vision import preprocess_images

__all__ = [
    "R1_INSTRUCTION",
    "PolicyBundle",
    "PromptConfig",
    "TinyDims",
    "build_tiny_policy",
    "completion_logprobs",
    "load_policy",
    "preprocess_images",
    "repeat_prompt_inputs",
]
