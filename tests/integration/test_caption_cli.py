"""`bigmodel caption` on a real checkpoint: a captioning run trained by 2 tensor-parallel processes, decoded in one
process from its sharded checkpoint; the captions equal greedy decoding of the consolidated weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bigmodel.config import load_config
from bigmodel.config.layout import active_objectives
from bigmodel.data import build_tokenizer
from bigmodel.data.shapes import render_shapes
from bigmodel.data.transforms import build_transform
from bigmodel.models import build_model
from bigmodel.models.generate import greedy_captions
from tests.support.cli import bigmodel

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
CAPTION = [
    "--model.text_causal=true",
    "--train.loss_weights.mlm=0",
    "--train.loss_weights.caption=1",
    "--train.steps=4",
    "--log.progress=false",
    "--log.wandb=disabled",
]


@pytest.mark.slow
def test_caption_command_decodes_a_tensor_parallel_checkpoint(tmp_path):
    out = tmp_path / "run"
    trained = bigmodel(
        "launch", "--nproc", "2", "--config", TINY, "--parallel.tp=2", *CAPTION, f"--train.out_dir={out}"
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    cfg = load_config(TINY, CAPTION)
    images = []
    for index in range(3):  # held-out images of the embedded dataset, as PNG files
        pixels, _ = render_shapes("eval", index, cfg.model.image_size, cfg.data.max_shapes)
        images.append(tmp_path / f"eval_{index}.png")
        Image.fromarray(pixels).save(images[-1])

    result = bigmodel("caption", "--checkpoint", str(out), *map(str, images), "--max-tokens", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert [row[0] for row in rows] == [str(p) for p in images]

    # Reference: the consolidated weights in a plain model, the evaluation transform, greedy decoding.
    weights = tmp_path / "model.safetensors"
    consolidated = bigmodel("ckpt", "consolidate", str(out), str(weights))
    assert consolidated.returncode == 0, consolidated.stderr[-3000:]
    model = build_model(cfg.model, active_objectives(cfg.train.loss_weights))
    model.load_state_dict(load_file(weights))
    transform = build_transform(cfg, train=False)
    pixels = torch.stack(
        [
            torch.from_numpy(transform(np.asarray(Image.open(p).convert("RGB")), np.random.default_rng(0)))
            for p in images
        ]
    )
    tokenizer = build_tokenizer(cfg.data)
    ids = greedy_captions(model.eval(), pixels, tokenizer.bos_id, tokenizer.eos_id, 8)
    assert [row[1] for row in rows] == [tokenizer.decode(row) for row in ids]
    assert all(len(row) <= 8 for row in ids)

    # A checkpoint without a caption head is a one-line error.
    plain = tmp_path / "plain"
    trained = bigmodel("train", "--config", TINY, "--train.steps=3", "--log.progress=false", f"--train.out_dir={plain}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    refused = bigmodel("caption", "--checkpoint", str(plain), str(images[0]))
    assert refused.returncode != 0
    assert "trained without the captioning objective" in refused.stderr.strip().splitlines()[-1], refused.stderr
