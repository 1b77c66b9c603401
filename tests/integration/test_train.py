"""Whole single-process training runs on the tiny config: the reference later parallel layouts must reproduce."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bigmodel.config import load_config
from bigmodel.train.loop import train

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


def tiny(tmp_path: Path, *overrides: str):
    quiet = ["--log.progress=false", "--log.wandb=disabled", f"--train.out_dir={tmp_path / 'run'}"]
    return load_config(TINY, [*quiet, *overrides])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_loss_falls_and_run_directory_is_complete(tmp_path):
    result = train(tiny(tmp_path, "--train.steps=40", "--log.every=5"))
    run = tmp_path / "run"
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(5, 41, 5))
    for key in ("step", "loss", "loss_contrastive", "loss_itm", "loss_mlm", "lr", "grad_norm", "samples_per_s", "mfu"):
        assert key in records[0], key
    # 40 steps at lr 1e-3 take the tiny model's total loss from ~8.6 (chance: ln 16 + ln 2 + ln 30) well down; a
    # drop of 10% is far outside step-to-step noise (~1%) yet reached by any working optimizer within 40 steps.
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-2:]) / 2
    assert last < 0.9 * first, (first, last)
    evals = read_jsonl(run / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 40]
    assert evals[-1]["mlm_acc"] > evals[0]["mlm_acc"]
    assert (run / "config.yaml").is_file()
    assert load_config(run / "config.yaml") == tiny(tmp_path, "--train.steps=40", "--log.every=5")
    assert result.checkpoint == run / "checkpoints" / "step_00000040"
    manifest = json.loads((result.checkpoint / "manifest.json").read_text())
    assert manifest["step"] == 40 and manifest["extra"]["loader"]["step"] == 40
    assert (run / "checkpoints" / "latest").read_text() == "step_00000040"


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_uninterrupted_run_exactly(tmp_path, workers):
    # Dropout on: its draws are seeded per step, so a resumed run needs no saved RNG state to match. With loader
    # workers, starting them must not draw from the global RNG either (it would shift the dropout of the first step).
    common = ["--train.steps=6", "--log.every=1", "--model.dropout=0.1", "--train.deterministic=true"]
    common.append(f"--data.num_workers={workers}")
    train(tiny(tmp_path / "whole", *common, "--checkpoint.every=3"))
    midway = tmp_path / "whole" / "run" / "checkpoints" / "step_00000003"
    resumed = train(tiny(tmp_path / "resumed", *common, f"--checkpoint.resume={midway}"))
    whole = [r["loss"] for r in read_jsonl(tmp_path / "whole" / "run" / "metrics.jsonl")]
    after = [r["loss"] for r in read_jsonl(tmp_path / "resumed" / "run" / "metrics.jsonl")]
    # Same layout, deterministic kernels, the same data position, weights, optimizer state and schedule: bitwise.
    assert after == whole[3:]
    assert resumed.final_loss == whole[-1]
    assert resumed.eval_before == {}, "a resumed run does not re-evaluate its starting point"


def test_resume_auto_without_a_checkpoint_starts_fresh(tmp_path):
    result = train(tiny(tmp_path, "--train.steps=2", "--train.warmup_steps=0", "--checkpoint.resume=auto"))
    assert result.eval_before, "a fresh start evaluates before training"


def test_deterministic_mode_reruns_bit_identically(tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        train(tiny(out, "--train.steps=6", "--log.every=1", "--train.deterministic=true", "--model.dropout=0.1"))
        runs.append([r["loss"] for r in read_jsonl(out / "run" / "metrics.jsonl")])
    assert runs[0] == runs[1]


def test_gradient_accumulation_matches_the_whole_batch(tmp_path):
    # Image-text matching is a mean over equally many pairs in every microbatch, so accumulating two half batches
    # must give the same gradients (and losses) as one whole batch, up to fp32 summation order (~1e-6 relative).
    losses = {}
    for accum in (1, 2):
        out = tmp_path / f"accum{accum}"
        cfg = tiny(
            out,
            "--train.steps=5",
            "--log.every=1",
            f"--train.grad_accum={accum}",
            "--train.loss_weights.contrastive=0",
            "--train.loss_weights.mlm=0",
        )
        train(cfg)
        losses[accum] = [r["loss"] for r in read_jsonl(out / "run" / "metrics.jsonl")]
    assert losses[1] == pytest.approx(losses[2], rel=1e-5)


@pytest.mark.parametrize("fusion", ["none", "merged", "cross"])
def test_each_fusion_kind_trains_in_bf16(tmp_path, fusion):
    extra = ["--model.fusion_layers=0", "--train.loss_weights.itm=0", "--train.loss_weights.mlm=0"]
    overrides = [f"--model.fusion={fusion}", "--train.precision=bf16", "--train.steps=4", "--log.every=1"]
    result = train(tiny(tmp_path, *overrides, *(extra if fusion == "none" else [])))
    assert torch.isfinite(torch.tensor(result.final_loss))
    assert "i2t_r1" in result.eval_after


def test_activation_checkpointing_gives_the_same_run(tmp_path):
    losses = []
    for flag in ("false", "true"):
        out = tmp_path / flag
        train(tiny(out, "--train.steps=4", "--log.every=1", f"--train.activation_checkpointing={flag}"))
        losses.append([r["loss"] for r in read_jsonl(out / "run" / "metrics.jsonl")])
    # Recomputation replays exactly the same kernels on the same inputs: identical results.
    assert losses[0] == losses[1]


def test_resuming_a_different_model_is_a_one_line_error(tmp_path):
    train(tiny(tmp_path / "a", "--train.steps=3", "--train.warmup_steps=0"))
    checkpoint = tmp_path / "a" / "run" / "checkpoints" / "step_00000003"
    with pytest.raises(ValueError) as info:
        train(tiny(tmp_path / "b", "--train.steps=4", "--model.text_layers=3", f"--checkpoint.resume={checkpoint}"))
    assert "model.text_layers=2 there, 3 here" in str(info.value) and "\n" not in str(info.value)


def test_profiled_steps_write_a_trace_and_change_nothing(tmp_path):
    import gzip

    common = ["--train.steps=4", "--log.every=1", "--train.deterministic=true"]
    train(tiny(tmp_path / "plain", *common))
    train(tiny(tmp_path / "profiled", *common, "--log.profile_step=2", "--log.profile_steps=2"))
    losses = [
        [r["loss"] for r in read_jsonl(tmp_path / run / "run" / "metrics.jsonl")] for run in ("plain", "profiled")
    ]
    assert losses[0] == losses[1], "profiling only observes"
    profile = tmp_path / "profiled" / "run" / "profile"
    assert sorted(p.name for p in profile.iterdir()) == ["rank0.json.gz", "rank0.txt"]
    events = json.loads(gzip.decompress((profile / "rank0.json.gz").read_bytes()))["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"step 2", "step 3"} <= names and "step 1" not in names and "step 4" not in names
    assert "aten::addmm" in names  # the operators inside the steps
    assert "Self CPU" in (profile / "rank0.txt").read_text()


def test_a_failing_profiled_step_still_writes_the_trace(tmp_path, monkeypatch):
    import gzip

    from bigmodel.engines.native import NativeEngine

    calls = []
    real = NativeEngine.train_step

    def failing(self, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("step 3 failed")
        return real(self, batch)

    monkeypatch.setattr(NativeEngine, "train_step", failing)
    with pytest.raises(RuntimeError, match="step 3 failed"):
        train(tiny(tmp_path, "--train.steps=5", "--log.profile_step=2", "--log.profile_steps=3"))
    trace = gzip.decompress((tmp_path / "run" / "profile" / "rank0.json.gz").read_bytes())
    names = {e.get("name") for e in json.loads(trace)["traceEvents"]}
    assert {"step 2", "step 3"} <= names and "step 4" not in names


def test_a_profile_step_after_the_last_step_is_a_one_line_error(tmp_path):
    from bigmodel.config import ConfigError

    with pytest.raises(ConfigError, match=r"^log.profile_step=9 is after the last step \(train.steps=4\)"):
        tiny(tmp_path, "--train.steps=4", "--log.profile_step=9")
