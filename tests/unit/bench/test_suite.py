"""`bigmodel bench` in quick mode (tiny sizes): every benchmark runs end to end and writes its ratios. No timing
is asserted: the machine is shared, and quick sizes measure the plumbing, not the speed. Counted quantities
(collective bytes, model-state bytes) are exact and are checked against their theory. The model-state benchmark's
launch is the one tests/unit/tools/test_plan.py::test_model_state_matches_real_training_processes runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bigmodel.bench.common import Figure
from bigmodel.bench.distributed import COMM_LAYOUTS, comm_figures, run_jobs
from bigmodel.bench.suite import draw_ratios, markdown_table, run_suite

ROOT = Path(__file__).resolve().parents[3]


def sane(figure: dict) -> None:
    assert math.isfinite(figure["ratio"]) and figure["ratio"] > 0, figure["name"]
    assert figure["baseline"]["value"] > 0 and figure["candidate"]["value"] > 0, figure["name"]
    assert figure["command"] and figure["direction"] in ("<=", ">=")
    assert figure["met"] in (True, False)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    summary = run_suite(out, ["trainer", "clip", "checkpoint", "patch_dropout"], quick=True, progress=lambda _: None)
    return out, summary


def test_single_process_benches_write_their_figures(suite):
    out, summary = suite
    assert summary["errors"] == {}
    names = {f["name"] for f in summary["figures"]}
    assert names == {
        "trainer_vs_plain_loop",
        "model_vs_clip_fp32",
        "model_vs_clip_bf16",
        "cpu_mfu_fp32",
        "cpu_mfu_bf16",
        "model_vs_clip_fp32_compiled",
        "model_vs_clip_bf16_compiled",
        "cpu_mfu_fp32_compiled",
        "cpu_mfu_bf16_compiled",
        "cpu_fused_vs_plain_fp32",
        "cpu_fused_vs_plain_bf16",
        "checkpoint_save",
        "checkpoint_load",
        "patch_dropout_step_time",
    }
    for name in names:
        sane(json.loads((out / f"{name}.json").read_text()))
    assert (out / "ratios.png").stat().st_size > 0
    assert "| figure | baseline |" in (out / "table.md").read_text()


def test_mfu_is_flops_over_the_peak_measured_beside_it(suite):
    _, summary = suite
    for f in summary["figures"]:
        if f["name"].startswith("cpu_mfu"):
            # The ratio is a median of per-repeat ratios; it must lie between the extremes of those.
            per_repeat = f["details"]["per_repeat_mfu"]
            assert min(per_repeat) <= f["ratio"] <= max(per_repeat)
            assert f["candidate"]["value"] > 0 and f["baseline"]["value"] > 0


def test_compiled_model_is_timed_beside_the_eager_one(suite):
    _, summary = suite
    compiled = [f for f in summary["figures"] if f["name"].endswith("_compiled")]
    assert len(compiled) == 4
    for f in compiled:
        seconds = f["details"]["seconds"]
        assert seconds.keys() == {"clip", "ours", "compiled", "fused"}
        assert len({len(times) for times in seconds.values()}) == 1  # interleaved: one time of each per repeat
        assert f["details"]["compile_backend"] == "eager"  # quick mode traces with dynamo but compiles no C++
        assert f["details"]["compile_first_step_seconds"] > 0


def test_distributed_benches_count_what_the_planner_predicts():
    # One launch of 2 processes: the collectives of one step in four layouts. (The DeepSpeed ZeRO-3 comparison
    # reuses the deepspeed engine's start-up, which tests/distributed/engines/test_deepspeed.py covers; it stays out of
    # here to keep the suite's time down.)
    jobs = [f"comm:{layout}" for layout in COMM_LAYOUTS.values()]
    results = run_jobs(2, jobs, quick=True, repeats=1)
    for figure in comm_figures(results):
        sane(figure.to_dict())
        # Counted bytes are exact; beyond the planner's terms only scalars move (loss means, gradient norms, MLM
        # token counts) and ZeRO/FSDP pad uneven chunks: measured 1.0001-1.0013 of theory on this model.
        assert figure.ratio == pytest.approx(1.0, abs=0.05), figure.name


def test_pipeline_bench_reports_the_bubble():
    from bigmodel.bench.pipeline import pipeline_bubble

    figure = pipeline_bubble(quick=True).to_dict()
    sane(figure)
    assert figure["baseline"]["value"] == pytest.approx(1 / 5)  # (p-1)/(m+p-1) with p=2, m=4
    assert 0 <= figure["candidate"]["value"] < 1


def test_table_and_chart_from_figures(tmp_path):
    figures = [
        Figure("a", "title a", 0.9, 1.0, "<=", {"label": "x", "value": 2.0, "unit": "s/step"},
               {"label": "y", "value": 1.8, "unit": "s/step"}, "cmd a").to_dict(),
        Figure("b", "title b", 0.5, 0.8, ">=", {"label": "x", "value": 1e9, "unit": "bytes/s"},
               {"label": "y", "value": 5e8, "unit": "bytes/s"}, "cmd b").to_dict(),
    ]  # fmt: skip
    table = markdown_table(figures)
    assert "| title a | x: 2000.0 ms/step | y: 1800.0 ms/step | 0.900 | <= 1.0 | yes | `cmd a` |" in table
    assert "| **no** |" in table
    draw_ratios(figures, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 0


def test_gpu_mfu_script_runs_on_cpu():
    from bigmodel.bench import gpu_mfu

    result = gpu_mfu.run("cpu", tiny=True, batch_size=2, warmup=0, steps=1)
    assert result["correctness"]["passed"], result["correctness"]
    assert result["parameters"] > 0 and result["train_flops_per_step"] > 0
    assert result["mfu_vs_h200_bf16_peak"] > 0 and result["mfu_vs_measured_peak"] > 0
    assert gpu_mfu.model_config(tiny=False) is not None
