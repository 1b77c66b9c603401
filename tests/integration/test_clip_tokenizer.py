"""OpenAI CLIP's real tokenizer end to end: a tiny pretraining run (49408 ids) that trains, resumes exactly and is
evaluated by `bigmodel eval`; and, with [MASK] added to the tokenizer, the masked-LM objective too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tokenizers import Tokenizer

from bigmodel.config import load_config
from bigmodel.train.loop import train
from tests.support.clip_tokenizer import VOCAB_SIZE

ROOT = Path(__file__).resolve().parents[2]
QUICK = ["--log.progress=false", "--log.wandb=disabled", "--log.every=1", "--data.eval_size=32"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def clip_run(recipe: str, out: Path, tokenizer: Path, vocab_size: int, *overrides: str):
    args = [*QUICK, f"--model.vocab_size={vocab_size}", f"--data.tokenizer={tokenizer}", f"--train.out_dir={out}"]
    return load_config(ROOT / "configs" / recipe, [*args, *overrides])


def test_pretrain_resume_and_evaluate_with_clips_tokenizer(clip_tokenizer_dir: Path, tmp_path: Path) -> None:
    common = ["--train.steps=4", "--train.deterministic=true", "--train.warmup_steps=0"]
    whole = tmp_path / "whole"
    train(clip_run("tiny-clip.yaml", whole, clip_tokenizer_dir, VOCAB_SIZE, *common, "--checkpoint.every=2"))
    midway = whole / "checkpoints" / "step_00000002"
    resumed = tmp_path / "resumed"
    train(clip_run("tiny-clip.yaml", resumed, clip_tokenizer_dir, VOCAB_SIZE, *common, f"--checkpoint.resume={midway}"))
    losses = [r["loss"] for r in read_jsonl(whole / "metrics.jsonl")]
    # Same layout, deterministic kernels, the same data position, weights and optimizer state: bitwise.
    assert [r["loss"] for r in read_jsonl(resumed / "metrics.jsonl")] == losses[2:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    evaluated = subprocess.run(
        [sys.executable, "-m", "bigmodel.cli.main", "eval", str(whole), "--json"],
        cwd=tmp_path,  # the run's config names the tokenizer folder by its absolute path
        env=env,
        capture_output=True,
        text=True,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    final = read_jsonl(whole / "eval.jsonl")[-1]
    # Same weights, same held-out batches, same kernels: the standalone evaluation reproduces the run's own.
    assert json.loads(evaluated.stdout)["i2t_r1"] == final["i2t_r1"]


def test_masked_lm_with_a_mask_token_added_to_clips_tokenizer(clip_tokenizer_dir: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(clip_tokenizer_dir, tmp_path / "tokenizer")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.add_special_tokens(["[MASK]"])  # what the missing-mask error tells a user to run
    tokenizer.save(str(folder / "tokenizer.json"))
    cfg = clip_run("tiny.yaml", tmp_path / "run", folder, VOCAB_SIZE + 1, "--train.steps=2", "--train.warmup_steps=0")
    result = train(cfg)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all(r["loss_mlm"] > 0 for r in records) and result.checkpoint.name == "step_00000002"
