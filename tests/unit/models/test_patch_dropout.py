"""Patch dropout (FLIP): keep sets drawn from the per-sample seeds, in training only; the vision tower runs on the kept
patches at their own positions; evaluation sees every patch; FLOPs and the planner follow the kept tokens."""

from __future__ import annotations

from pathlib import Path

import torch

from bigmodel.config import load_config
from bigmodel.data import build_eval_loader, build_train_loader
from bigmodel.models import build_model
from bigmodel.models.encoder import image_tokens, kept_patches
from bigmodel.models.flops import flops_per_sample

TINY = str(Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml")
DROP = ["--model.patch_dropout=0.5", "--log.wandb=disabled"]


def first_batch(overrides: list[str], dp_rank: int = 0, dp_size: int = 1) -> dict[str, torch.Tensor]:
    return next(iter(build_train_loader(load_config(TINY, overrides), dp_rank=dp_rank, dp_size=dp_size)))


def test_keep_sets_come_from_the_sample_seeds_and_change_nothing_else() -> None:
    cfg = load_config(TINY, DROP)
    patches = (cfg.model.image_size // cfg.model.patch_size) ** 2
    batch = first_batch(DROP)
    keep = batch["patch_keep"]
    assert keep.shape == (cfg.train.global_batch_size, kept_patches(cfg.model)) == (keep.shape[0], patches // 2)
    assert keep.dtype == torch.int64 and int(keep.min()) >= 0 and int(keep.max()) < patches
    for row in keep:  # sorted, distinct
        assert torch.equal(row, row.unique())
    assert len({tuple(row.tolist()) for row in keep}) > 1  # each sample draws its own set
    # Reproducible: the same step's batch again, and each rank's share of it on 2 data-parallel ranks.
    assert torch.equal(first_batch(DROP)["patch_keep"], keep)
    shares = [first_batch(DROP, rank, 2)["patch_keep"] for rank in range(2)]
    assert torch.equal(torch.cat(shares), keep)
    # Drawn after the other draws: switching patch dropout on changes no other feature of a sample.
    plain = first_batch(["--log.wandb=disabled"])
    assert "patch_keep" not in plain
    for name, value in plain.items():
        assert torch.equal(batch[name], value), name


def test_the_tower_runs_on_the_kept_patches_and_evaluation_sees_every_patch() -> None:
    cfg = load_config(TINY, DROP)
    batch = first_batch(DROP)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    vision = model.vision
    keep = batch["patch_keep"]
    vision.train()
    dropped = vision.embed(batch["pixel_values"], keep)
    everything = vision.embed(batch["pixel_values"])  # (B, 1 + N, Dv)
    assert dropped.shape[1] == 1 + keep.shape[1] == image_tokens(cfg.model, training=True)
    # pre_norm is per token, so the kept tokens equal the full sequence's tokens at [0] + (keep + 1).
    rows = torch.arange(keep.shape[0])[:, None]
    index = torch.cat([torch.zeros_like(keep[:, :1]), keep + 1], dim=1)
    torch.testing.assert_close(dropped, everything[rows, index], rtol=0, atol=0)
    # In eval mode the keep sets are ignored, and the evaluation loader draws none.
    vision.eval()
    torch.testing.assert_close(vision.embed(batch["pixel_values"], keep), everything, rtol=0, atol=0)
    held_out = next(iter(build_eval_loader(cfg, batch_size=4)))
    assert "patch_keep" not in held_out
    # The whole model trains on fewer image tokens than it evaluates on, so the losses differ.
    model.train()
    with torch.no_grad():
        trained = model(batch)["image_embeds"]
        full = model({k: v for k, v in batch.items() if k != "patch_keep"})["image_embeds"]
    assert not torch.allclose(trained, full)


def test_training_flops_count_the_kept_patches() -> None:
    full = load_config(TINY, ["--log.wandb=disabled"]).model
    half = load_config(TINY, DROP).model
    assert image_tokens(half) == image_tokens(full) == image_tokens(full, training=True)
    assert image_tokens(half, training=True) - 1 == (image_tokens(full) - 1) // 2
    dropped, plain = flops_per_sample(half), flops_per_sample(full)
    assert dropped["forward"] == plain["forward"]  # evaluation sees every patch
    assert dropped["train"] < plain["train"]
    assert dropped["train"] > 3 * (plain["forward"] - plain["vision"])  # the text side is unchanged
