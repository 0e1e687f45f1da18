"""Warm-up (SFT) stage: builds the embedded base policy that the RL configs start from.

`python -m diva_lightning warmup --config experiments/warmup.yaml [--output_dir DIR | --ship true]`

The recipe ships in the package as ``diva_lightning/system/warmup.yaml`` (`WARMUP_RECIPE`, what
:func:`ensure_base_policy` runs when a run's embedded base policy is missing, so an installed package needs no
repository); ``experiments/warmup.yaml`` is the same file for users to read and copy (a test keeps them equal).

``--ship true`` rebuilds the base policy the repository ships (``diva_lightning/assets/base_policy``, what
``policy: embedded`` loads); ``--output_dir`` builds it elsewhere (e.g. ``artifacts/base_policy``). Either way the
folder gets ``SHA256SUMS`` (every checkpoint file), ``recipe.yaml`` (the resolved config) and ``build_info.json``.

It builds the tiny Qwen2.5-VL (tokenizer trained on the world's text, random weights) and teaches it, with
a Lightning `fit` of `SFTModule` on `SFTDataModule`, the response format
`<think> ... </think> \\boxed{answer}` and a moderate skill on the procedural world. Training prompts include
paraphrases and hinted prompts, whose target goes on from the hint's last step (so the policy learns to use hints,
as the paper's hinted variants assume), but only clean images (so perturbations stay hard). The result is saved in
the standard `save_pretrained` layout at `output_dir`. Measured numbers: docs/calibration.md.
"""

from __future__ import annotations

import json
import platform
import random
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from diva_lightning.core.tiers import VariantSpec
from diva_lightning.data.schema import QuestionRecord, decode_image
from diva_lightning.data.variants import render_variant
from diva_lightning.data.world import format_response, generate_world, world_corpus
from diva_lightning.models.embedded import SHIPPED_DIR, file_sha256, write_checksums
from diva_lightning.models.logprobs import completion_logprobs
from diva_lightning.models.policy import PolicyBundle, load_policy
from diva_lightning.models.tiny import build_tiny_policy

WARMUP_RECIPE = Path(__file__).with_name("warmup.yaml")
"""The warm-up recipe shipped in the package (equal to experiments/warmup.yaml)."""


@dataclass
class SFTWorld:
    """Which world questions the warm-up trains on."""

    size: int = 4000
    """Number of training questions (the world's train split, same seed as the RL runs)."""
    seed: int = 0
    """World seed (must match the RL configs' `data.world.seed` so the tokenizer covers their text)."""
    levels: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    """Intrinsic levels to draw."""


def hinted_problem(record: QuestionRecord, steps: int, paraphrase_index: int | None = None) -> str:
    """The prompt of the RL data module's hint variant (same function, so SFT sees the exact RL text)."""
    spec = VariantSpec("hint", "hard", -1.0, hint_steps=steps, paraphrase_index=paraphrase_index)
    return render_variant(record, spec).prompt


class _SFTExamples(Dataset[tuple[str, str, Tensor]]):
    """(problem, target response, image) triples; prompt variants drawn deterministically per index."""

    def __init__(self, records: list[QuestionRecord], *, paraphrase_fraction: float, hint_fraction: float,
                 seed: int) -> None:
        self.records = records
        self.paraphrase_fraction, self.hint_fraction, self.seed = paraphrase_fraction, hint_fraction, seed
        self._images: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[str, str, Tensor]:
        rec = self.records[i]
        rng = random.Random(f"{self.seed}:{i}")
        u = rng.random()
        response = format_response(rec)
        if u < self.hint_fraction and len(rec.think_steps) >= 2:
            # like the planner: the first hint of a family is on the original text, later ones on paraphrases
            para = rng.randrange(len(rec.variants)) if rec.variants and rng.random() < 0.5 else None
            hint = rng.randint(1, len(rec.think_steps) - 1)
            problem, response = hinted_problem(rec, hint, para), format_response(rec, after_hint=hint)
        elif u < self.hint_fraction + self.paraphrase_fraction and rec.variants:
            problem = rng.choice(rec.variants)
        else:
            problem = rec.problem
        if i not in self._images:
            self._images[i] = decode_image(rec.images[0], None)
        return problem, response, self._images[i]


def _collate(items: list[tuple[str, str, Tensor]]) -> tuple[list[str], list[str], list[Tensor]]:
    problems, responses, images = zip(*items)
    return list(problems), list(responses), list(images)


class SFTDataModule(pl.LightningDataModule):
    """Supervised pairs from the procedural world.

    Args:
        world: which questions.
        batch_size: examples per optimizer step.
        paraphrase_fraction: share of prompts replaced by one of the question's paraphrases.
        hint_fraction: share of prompts carrying a hint with 1..n-1 of the question's think steps.
        seed: seed of the prompt-variant draws.
    """

    def __init__(self, world: SFTWorld | None = None, batch_size: int = 32, paraphrase_fraction: float = 0.3,
                 hint_fraction: float = 0.3, seed: int = 0) -> None:
        super().__init__()
        self.world = world or SFTWorld()
        self.batch_size = batch_size
        self.paraphrase_fraction, self.hint_fraction, self.seed = paraphrase_fraction, hint_fraction, seed
        self.records: list[QuestionRecord] = []

    def records_for_tokenizer(self) -> list[QuestionRecord]:
        if not self.records:
            self.records = generate_world(self.world.size, seed=self.world.seed, split="train",
                                          levels=tuple(self.world.levels))
        return self.records

    @override
    def setup(self, stage: str) -> None:
        self.records_for_tokenizer()

    @override
    def train_dataloader(self) -> DataLoader[Any]:
        ds = _SFTExamples(self.records, paraphrase_fraction=self.paraphrase_fraction,
                          hint_fraction=self.hint_fraction, seed=self.seed)
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=True, generator=g, collate_fn=_collate,
                          drop_last=True)


class SFTModule(pl.LightningModule):
    """Builds the tiny policy and trains it by teacher forcing on the world's worked responses.

    Args:
        output_dir: where the trained base policy is saved (standard `save_pretrained` layout).
        dims: tiny model dimensions (see `diva_lightning.models.tiny.TinyDims`).
        lr / weight_decay / warmup_steps: AdamW with linear warm-up then cosine decay to 10%.
        model_seed: seed of the random initialisation and the tokenizer build.
    """

    def __init__(self, output_dir: str = "artifacts/base_policy", dims: dict[str, int] | None = None,
                 lr: float = 2e-3, weight_decay: float = 0.01, warmup_steps: int = 20,
                 model_seed: int = 0) -> None:
        super().__init__()
        self.output_dir = output_dir
        self.dims = dict(dims or {})
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.model_seed = model_seed
        self.bundle: PolicyBundle | None = None
        self.policy: torch.nn.Module | None = None
        self.save_hyperparameters()

    def build_policy(self, records: list[QuestionRecord]) -> PolicyBundle:
        """Build the untrained tiny policy, its tokenizer trained on the text of ``records``."""
        with tempfile.TemporaryDirectory() as tmp:
            build_tiny_policy(tmp, world_corpus(records), seed=self.model_seed, **self.dims)
            self.bundle = load_policy(tmp)
        self.policy = self.bundle.model.train()  # load_policy returns eval mode
        return self.bundle

    @override
    def configure_model(self) -> None:
        if self.policy is None:
            self.build_policy(self.trainer.datamodule.records_for_tokenizer())

    def sft_loss(self, problems: list[str], responses: list[str], images: list[Tensor]
                 ) -> tuple[Tensor, Tensor]:
        """Mean token NLL of the responses (plus the end-of-turn token) and the share of tokens with
        probability > 1/2, for B examples (images [3, H, W] each); both scalars."""
        assert self.bundle is not None
        tok = self.bundle.tokenizer
        inputs = self.bundle.encode(problems, [[img.to(self.device)] for img in images])
        end = tok.convert_tokens_to_ids("<|im_end|>")
        rows = [tok(r, add_special_tokens=False)["input_ids"] + [end] for r in responses]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), int(tok.pad_token_id), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        logp, _ = completion_logprobs(self.bundle.model, inputs, ids, mask)
        n = mask.sum()
        return -(logp * mask).sum() / n, ((logp > -0.693) & mask.bool()).sum() / n

    @override
    def training_step(self, batch: tuple[list[str], list[str], list[Tensor]], batch_idx: int) -> Tensor:
        loss, token_acc = self.sft_loss(*batch)
        self.log("sft/loss", loss, prog_bar=True, batch_size=len(batch[0]))
        self.log("sft/token_acc", token_acc, prog_bar=True, batch_size=len(batch[0]))
        return loss

    @override
    def configure_optimizers(self) -> Any:
        assert self.policy is not None
        opt = torch.optim.AdamW(self.policy.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warm = min(self.warmup_steps, total)

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = (step - warm) / max(total - warm, 1)
            return 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @override
    def on_fit_end(self) -> None:
        if self.trainer.global_rank == 0 and self.bundle is not None:
            self.bundle.save(self.output_dir)
            info = write_build_info(self.output_dir, steps=int(self.trainer.global_step))
            write_checksums(self.output_dir)
            print(f"[diva-lightning] base policy saved to {self.output_dir} (weights sha256 "
                  f"{info['weights_sha256'][:12]}..., {info['cpu_capability']}; see build_info.json)", flush=True)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_build_info(output_dir: str | Path, *, steps: int) -> dict[str, Any]:
    """Record what a base-policy build depends on in ``<output_dir>/build_info.json`` and return it.

    The warm-up is deterministic on one machine, but float kernels differ between CPUs (instruction sets, thread
    counts), so two machines can build different weights from the same code. The weights' sha256 tells builds apart;
    the versions and CPU facts say where a difference can come from.
    """
    import transformers

    out = Path(output_dir)
    weights = out / "model.safetensors"
    digest = file_sha256(weights) if weights.is_file() else ""
    info: dict[str, Any] = {
        "weights_sha256": digest,
        "sft_steps": steps,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
    }
    (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


class WarmupCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--output_dir", type=str | None, default=None,
                            help="Where to save the base policy (overrides model.output_dir).")
        parser.add_argument("--ship", type=bool, default=False,
                            help="Save into the shipped folder that `policy: embedded` loads (replaces it).")

    def before_instantiate_classes(self) -> None:
        out = str(SHIPPED_DIR) if self.config.get("ship") else self.config.get("output_dir")
        if out and self.config.get("ship") and self.config.get("output_dir"):
            raise ValueError("warmup: give --output_dir or --ship true, not both")
        if out:
            self.config["model"]["output_dir"] = out


def warmup_main(argv: list[str] | None = None) -> None:
    """`python -m diva_lightning warmup --config experiments/warmup.yaml [--output_dir DIR]`."""
    args = list(sys.argv[1:] if argv is None else argv)
    cli = WarmupCLI(SFTModule, SFTDataModule, run=False, args=args, save_config_kwargs={"overwrite": True})
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if cli.trainer.global_rank == 0:
        out = Path(cli.model.output_dir)
        if cli.config.get("ship"):  # the recipe names the folder as a clone sees it, not this machine's path
            cli.config["model"]["output_dir"] = str(SHIPPED_DIR.relative_to(SHIPPED_DIR.parents[2]))
        cli.parser.save(cli.config, str(out / "recipe.yaml"), overwrite=True, skip_check=True)


def ensure_base_policy(policy: str, recipe: str | Path | None = None) -> None:
    """Build the embedded base policy at ``policy`` by running the warm-up ``recipe`` (None: `WARMUP_RECIPE`) in
    a subprocess, unless it already exists."""
    target = Path(policy)
    if (target / "config.json").exists():
        return
    recipe_path = Path(recipe) if recipe is not None else WARMUP_RECIPE
    if not recipe_path.exists():
        raise FileNotFoundError(
            f"policy checkpoint {policy!r} is missing and the warm-up recipe {str(recipe_path)!r} was not found to "
            "build it")
    print(f"[diva-lightning] base policy {policy!r} not found: building it with `{recipe_path}` "
          "(tiny Qwen2.5-VL, SFT warm-up on the procedural world; cached afterwards)", flush=True)
    cmd = [sys.executable, "-m", "diva_lightning", "warmup", "--config", str(recipe_path),
           "--output_dir", str(target)]
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0 or not (target / "config.json").exists():
        raise RuntimeError(f"building the base policy failed (exit {done.returncode}): {' '.join(cmd)}")
    print(f"[diva-lightning] base policy ready at {target}", flush=True)
