"""The downstream task and its training loop: classify an attribute of the first shape of an embedded-dataset image
(its kind, colour or size, read from the caption) from the pretrained image tower's class token.

Runs on accelerate in whatever accelerate was launched with: one process, or DDP over several
(`accelerate launch --multi_gpu --num_processes N`, gloo on CPU). Every process sees the same global batches
(`split_batches`: each takes its slice), so N processes follow the 1-process run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from bigmodel.data.shapes import COLOURS, SHAPES, SIZES, render_shapes
from bigmodel.finetune.weights import load_vision_tower

Task = Literal["shape", "colour", "size"]
CLASSES: dict[str, tuple[str, ...]] = {"size": tuple(SIZES), "colour": tuple(COLOURS), "shape": tuple(SHAPES)}
_CAPTION_WORD = {"size": 1, "colour": 2, "shape": 3}
"""Position of the attribute in a caption's first phrase: "a {size} {colour} {shape} {where}"."""


@dataclass
class FinetuneConfig:
    """One fine-tuning run."""

    source: str
    """The pretrained model: a checkpoint folder or run directory, a consolidated .safetensors file, or an
    export-hf directory (bigmodel.finetune.weights)."""
    task: Task = "shape"
    """The attribute to classify: shape (4 kinds), colour (8) or size (2) of the image's first shape."""
    head: Literal["linear", "mlp"] = "linear"
    """A linear probe, or a 2-layer MLP (hidden size = the tower's width)."""
    pool: Literal["cls", "mean"] = "cls"
    """The image embedding the head reads: the class token (what CLIP's projection reads), or the mean of all tokens
    (more informative after little pretraining)."""
    train_encoder: bool = False
    """Also update the image tower (full fine-tuning); off: only the head learns (the tower runs without grad)."""
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 64
    """Samples per optimizer step, over all processes and accumulation steps."""
    grad_accum: int = 1
    """Microbatches per step; must divide batch_size (and batch_size / grad_accum is split over the processes)."""
    lr: float = 3e-3
    """AdamW learning rate (constant)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16: autocast through accelerate (parameters stay fp32)."""
    max_shapes: int = 1
    """Shapes per image (1: the attribute is the image's only shape)."""
    train_size: int = 4096
    """Distinct training images (cycled)."""
    eval_size: int = 512
    """Held-out images (the embedded dataset's eval split) for accuracy."""
    seed: int = 0
    """Seed of the head's initialisation."""
    out_dir: str = ""
    """If set, the main process writes classifier.safetensors (tower + head) and finetune.json here."""


@dataclass
class FinetuneResult:
    """Held-out accuracy before (untrained head) and after, the chance level (the majority class's share of the
    held-out set), the last step's training loss and the per-step losses."""

    task: str
    classes: list[str]
    chance: float
    accuracy_before: float
    accuracy_after: float
    final_loss: float
    losses: list[float]
    processes: int


class ShapesAttributes(torch.utils.data.Dataset):
    """(pixels (3, S, S) in [-1, 1], label) of the embedded dataset's `split`, labelled with `task`."""

    def __init__(self, split: str, size: int, image_size: int, max_shapes: int, task: Task) -> None:
        self.split, self.size, self.image_size, self.max_shapes, self.task = split, size, image_size, max_shapes, task

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, caption = render_shapes(self.split, index, self.image_size, self.max_shapes)
        word = caption.split()[_CAPTION_WORD[self.task]]
        pixels = (image.astype(np.float32) / 255.0 - 0.5) / 0.5  # as bigmodel.data.dataset feeds pretraining
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy()), CLASSES[self.task].index(word)


class Classifier(nn.Module):
    """The image tower's normalised tokens, pooled, into a head; `train_encoder` False runs the tower without grad."""

    def __init__(self, tower: nn.Module, width: int, classes: int, cfg: FinetuneConfig) -> None:
        super().__init__()
        head, self.pool, self.train_encoder = cfg.head, cfg.pool, cfg.train_encoder
        self.tower = tower.requires_grad_(self.train_encoder)
        if head == "linear":
            self.head = nn.Linear(width, classes)
        else:
            self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, classes))

        # Features are standardised with statistics fixed before training (set_feature_statistics), as linear
        # probes standardise them (MAE uses a BatchNorm without affine): a briefly pretrained tower's embeddings
        # vary across images by ~1e-2, too little for a head to learn from at any sane learning rate. Fixed, not
        # batch statistics, so that every process and every batch split computes the same function.
        self.register_buffer("feature_mean", torch.zeros(width))
        self.register_buffer("feature_std", torch.ones(width))

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The pooled embedding (B, Dv), before standardisation."""
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            tokens = self.tower(pixels)  # (B, 1 + N, Dv)
            return tokens[:, 0] if self.pool == "cls" else tokens.mean(dim=1)

    @torch.no_grad()
    def set_feature_statistics(self, pixels: torch.Tensor) -> None:
        """Standardise features by their mean and std over `pixels` (B, C, H, W), a sample of training images."""
        features = self.features(pixels)
        self.feature_mean.copy_(features.mean(dim=0))
        self.feature_std.copy_(features.std(dim=0).clamp_min(1e-6))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head((self.features(pixels) - self.feature_mean) / self.feature_std)  # (B, classes)


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Train the classifier of `cfg` in this process's part of the accelerate job and return the result (every
    process returns the same). ValueError (one line) for a batch that does not split."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    accelerator = Accelerator(
        # Without a GPU, accelerate joins the processes a launcher started only when told it runs on CPU (then gloo
        # DDP); otherwise each would silently train alone.
        cpu=not torch.cuda.is_available(),
        mixed_precision="bf16" if cfg.precision == "bf16" else "no",
        gradient_accumulation_steps=cfg.grad_accum,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
    microbatch = cfg.batch_size // cfg.grad_accum
    if cfg.batch_size % cfg.grad_accum or microbatch % accelerator.num_processes:
        raise ValueError(
            f"batch_size={cfg.batch_size} must split into grad_accum={cfg.grad_accum} microbatches that split over "
            f"{accelerator.num_processes} processes; choose a multiple of {cfg.grad_accum * accelerator.num_processes}"
        )
    model_cfg, tower = load_vision_tower(cfg.source)
    if model_cfg.channels != 3:
        raise ValueError(f"the embedded shapes are RGB; the model has model.channels={model_cfg.channels}")
    torch.manual_seed(cfg.seed)
    model = Classifier(tower, model_cfg.vision_width, len(CLASSES[cfg.task]), cfg)
    train_set = ShapesAttributes("train", cfg.train_size, model_cfg.image_size, cfg.max_shapes, cfg.task)
    model.eval().set_feature_statistics(torch.stack([train_set[i][0] for i in range(min(512, len(train_set)))]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, foreach=False)
    loader = torch.utils.data.DataLoader(train_set, batch_size=microbatch, shuffle=False, drop_last=True)
    evaluation = ShapesAttributes("eval", cfg.eval_size, model_cfg.image_size, cfg.max_shapes, cfg.task)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    before = accuracy(accelerator.unwrap_model(model), evaluation)
    losses = train_steps(accelerator, model, optimizer, loader, cfg.steps * cfg.grad_accum)
    after = accuracy(accelerator.unwrap_model(model), evaluation)
    labels = [evaluation[i][1] for i in range(len(evaluation))]
    result = FinetuneResult(
        task=cfg.task,
        classes=list(CLASSES[cfg.task]),
        chance=float(np.bincount(labels).max() / len(labels)),
        accuracy_before=before,
        accuracy_after=after,
        final_loss=losses[-1],
        losses=losses,
        processes=accelerator.num_processes,
    )
    if cfg.out_dir and accelerator.is_main_process:
        save_classifier(Path(cfg.out_dir), accelerator.unwrap_model(model), cfg, result)
    accelerator.wait_for_everyone()
    return result


def train_steps(accelerator, model: nn.Module, optimizer, loader, microbatches: int) -> list[float]:
    """Run `microbatches` microbatches (cycling the loader); the global mean loss of each optimizer step."""
    model.train()
    losses, step_loss, seen = [], 0.0, 0
    while seen < microbatches:
        for pixels, labels in loader:
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss = nn.functional.cross_entropy(model(pixels).float(), labels)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            step_loss += accelerator.reduce(loss.detach(), reduction="mean").item()
            seen += 1
            if accelerator.sync_gradients:
                losses.append(step_loss / accelerator.gradient_accumulation_steps)
                step_loss = 0.0
            if seen == microbatches:
                break
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, dataset: ShapesAttributes, batch_size: int = 256) -> float:
    """Share of `dataset` the model labels right (run whole on every process)."""
    model.eval()
    hits = 0
    for pixels, labels in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        hits += (model(pixels.to(next(model.parameters()).device)).argmax(-1).cpu() == labels).sum().item()
    return hits / len(dataset)


def save_classifier(out: Path, model: Classifier, cfg: FinetuneConfig, result: FinetuneResult) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, out / "classifier.safetensors")
    (out / "finetune.json").write_text(json.dumps({"config": asdict(cfg), "result": asdict(result)}, indent=2))
