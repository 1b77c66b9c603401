"""(l) Patch dropout (FLIP): the training step time of one model at model.patch_dropout=0.5 against 0, side by side.

The model is CLIP-shaped with an image tower that dominates the step (256 patches against 32 caption tokens), the
regime patch dropout is for; the FLOPs model's prediction for the same two configs is recorded beside the ratio.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from bigmodel.bench.common import Figure, interleaved, median, paired_ratio
from bigmodel.config.schema import LossWeights, ModelConfig
from bigmodel.losses import total_loss
from bigmodel.models import build_model
from bigmodel.models.encoder import kept_patches
from bigmodel.models.flops import flops_per_sample

RATE = 0.5


def bench_config(quick: bool) -> ModelConfig:
    """Fusion none, causal text, quick GELU (CLIP's shape); 128 px / 8 px patches = 256 patches."""
    width, layers, image = (32, 1, 32) if quick else (256, 4, 128)
    return ModelConfig(
        image_size=image, patch_size=8, vision_width=width, vision_layers=layers, vision_heads=4,
        vision_mlp_dim=4 * width, vocab_size=1024, context_length=32, text_width=width, text_layers=layers,
        text_heads=4, text_mlp_dim=4 * width, text_causal=True, embed_dim=width, fusion="none", fusion_layers=0,
        activation="quick_gelu",
    )  # fmt: skip


def _batch(cfg: ModelConfig, rows: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, cfg.vocab_size, (rows, cfg.context_length), generator=generator)
    ids[:, -1] = 4  # full-length captions ending in EOS
    pixels = torch.randn(rows, cfg.channels, cfg.image_size, cfg.image_size, generator=generator)
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids)}


def patch_dropout_speed(quick: bool = False) -> list[Figure]:
    """Forward, contrastive loss and backward of the same weights with every patch and with half of them kept (the
    keep sets drawn as the data pipeline draws them: sorted, without replacement, per sample)."""
    full_cfg = bench_config(quick)
    drop_cfg = dataclasses.replace(full_cfg, patch_dropout=RATE)
    rows = 4 if quick else 16
    batch = _batch(full_cfg, rows)
    rng = np.random.default_rng(0)
    patches = (full_cfg.image_size // full_cfg.patch_size) ** 2
    keep = np.stack([np.sort(rng.choice(patches, kept_patches(drop_cfg), replace=False)) for _ in range(rows)])
    dropped = batch | {"patch_keep": torch.from_numpy(keep.astype(np.int64))}
    model = build_model(full_cfg, ("contrastive",), seed=0)
    model.train()
    weights = LossWeights(contrastive=1.0, itm=0.0, mlm=0.0)

    def step(inputs: dict[str, torch.Tensor]):
        def run() -> None:
            total_loss(model(inputs), weights)[0].backward()
            model.zero_grad(set_to_none=True)

        return run

    times = interleaved({"full": step(batch), "dropped": step(dropped)}, repeats=2 if quick else 7)
    flops = {
        name: flops_per_sample(c, ("contrastive",))["train"] for name, c in (("full", full_cfg), ("drop", drop_cfg))
    }
    command = "bigmodel bench --only patch_dropout" + (" --quick" if quick else "")
    return [
        Figure(
            name="patch_dropout_step_time",
            title=f"training step time, model.patch_dropout={RATE} / 0 ({patches} patches, "
            f"{full_cfg.context_length} caption tokens, same weights)",
            ratio=paired_ratio(times["dropped"], times["full"]),
            target=0.65,
            direction="<=",
            baseline={"label": "every patch", "value": median(times["full"]), "unit": "s/step"},
            candidate={
                "label": f"{kept_patches(drop_cfg)} of {patches} patches kept",
                "value": median(times["dropped"]),
                "unit": "s/step",
            },
            command=command,
            details={
                "seconds": times,
                "flops_ratio": flops["drop"] / flops["full"],
                "config": dataclasses.asdict(full_cfg),
                "batch": rows,
            },
        )
    ]
