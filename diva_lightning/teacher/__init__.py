"""A local teacher that makes DIVA's paraphrases and think steps offline (``python -m diva_lightning augment``).

See ``docs/teacher.md``. Modules: ``prompts`` (what is asked), ``parsing`` (numbered tags), ``checks`` (what
is kept), ``base`` (the teacher contract), ``hf`` / ``vllm`` / ``programmatic`` (the teachers), ``pipeline``
(one batch), ``writer`` (resumable output), ``report`` (the table), ``augment`` (the command).
"""

from diva_lightning.teacher.base import Request, Teacher
from diva_lightning.teacher.hf import HFTeacher
from diva_lightning.teacher.pipeline import AugmentSettings, RowResult, augment_batch
from diva_lightning.teacher.programmatic import WorldTeacher
from diva_lightning.teacher.vllm import VLLMTeacher

__all__ = ["AugmentSettings", "HFTeacher", "Request", "RowResult", "Teacher", "VLLMTeacher", "WorldTeacher",
           "augment_batch"]
