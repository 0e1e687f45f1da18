"""The prompt template: what the policy is told besides the problem (design.md section 9, issue 11).

Every problem and every variant of it (paraphrase, hinted, rotated) ends with the format instruction, then
goes through the model's chat template as the user turn. The default instruction is the authors' exact R1
sentence (reference: official-diva.md, "Prompt"); the authors use no custom system prompt, so the default
keeps the chat template's own system turn. The embedded warm-up and RL use this same code path
(`PolicyBundle.build_prompt`), so the tiny policy is trained on the text a real model is given.
"""

from __future__ import annotations

from dataclasses import dataclass

R1_INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in \\boxed{}."
)


@dataclass
class PromptConfig:
    """How a problem becomes the user turn of the chat.

    Attributes:
        instruction: appended to every problem and variant after one space; null sends the problem alone.
        system: the system turn; null keeps the chat template's default (Qwen: "You are a helpful assistant.").
    """

    instruction: str | None = R1_INSTRUCTION
    """Format instruction appended to every problem (default: the authors' R1 instruction); null: none."""
    system: str | None = None
    """System prompt; null keeps the chat template's default system turn (the authors' setting)."""

    def user_text(self, problem: str) -> str:
        """The user turn's text for ``problem`` (image tags untouched)."""
        if not self.instruction:
            return problem
        return f"{problem.rstrip()} {self.instruction}"

    def check(self) -> list[str]:
        """Problems with these settings (empty when valid), for the system's start-up validation."""
        problems = []
        if self.instruction is not None and not self.instruction.strip():
            problems.append("prompt.instruction is blank: use null for no instruction")
        if self.system is not None and not self.system.strip():
            problems.append("prompt.system is blank: use null for the chat template's default")
        if self.instruction and "<image>" in self.instruction:
            problems.append("prompt.instruction must not contain '<image>' (images are placed by the problem)")
        return problems
