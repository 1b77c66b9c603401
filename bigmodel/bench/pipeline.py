"""(i) Pipeline idle fraction against the theory (p - 1) / (m + p - 1), from the timeline the trainer records.

Two identical towers (8 blocks of width 512 each, 17 tokens), contrastive objective only, so the automatic split
gives each of the 2 ranks one tower and the stages do equal work, as the theory assumes. Steps 3-5 of 5 are recorded
and the median step is reported. Width and depth set the compute per byte handed between the stages: each stage
sends (and receives the gradient of) both streams' activations, width x 17 tokens per sample, while its compute
grows with width^2 x blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bigmodel.bench.common import ROOT, Figure


def bubble_model(width: int, layers: int) -> list[str]:
    heads = max(1, width // 64)
    return [
        f"--model.vision_width={width}", f"--model.vision_heads={heads}", f"--model.vision_mlp_dim={4 * width}",
        f"--model.vision_layers={layers}", f"--model.text_width={width}", f"--model.text_heads={heads}",
        f"--model.text_mlp_dim={4 * width}", f"--model.text_layers={layers}", "--model.context_length=17",
        f"--model.embed_dim={width // 2}", "--model.fusion=none", "--model.fusion_layers=0",
        "--train.loss_weights.itm=0", "--train.loss_weights.mlm=0",
    ]  # fmt: skip


def run_bubble(
    out: Path,
    schedule: str = "1f1b",
    microbatches: int = 8,
    microbatch_size: int = 32,
    quick: bool = False,
    width: int = 512,
    layers: int = 8,
    steps: int = 3,
) -> dict[str, Any]:
    """Train 2 + `steps` steps with p = 2 pipeline ranks, record the last `steps` (the first two also infer shapes
    and warm up) and return the timeline summary (median step) plus the ratio."""
    model = bubble_model(64, 2) if quick else bubble_model(width, layers)
    steps = 1 if quick else steps
    train = [
        "--config", str(ROOT / "configs" / "tiny.yaml"), *model,
        "--parallel.pp=2", f"--parallel.pp_schedule={schedule}", f"--parallel.microbatches={microbatches}",
        f"--train.global_batch_size={microbatches * microbatch_size}", f"--train.steps={2 + steps}",
        "--log.pp_timeline_step=3", f"--log.pp_timeline_steps={steps}", "--log.progress=false",
        "--log.wandb=disabled", "--checkpoint.save_final=false", "--data.eval_size=2", "--train.eval_batch_size=16",
        f"--train.out_dir={out}",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "bigmodel.train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*cmd, *train], cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pipeline run failed:\n{result.stderr[-3000:]}")
    summary = json.loads((out / "timeline_summary.json").read_text())
    busy = summary["busy_ms_per_rank"]
    ratio = summary["measured_bubble"] / summary["theoretical_bubble"]
    return summary | {"measured_over_theory": ratio, "stage_balance": min(busy) / max(busy)}


def pipeline_bubble(quick: bool = False) -> Figure:
    """The 1F1B idle fraction, p = 2, m = 8 (quick: m = 4, 8 samples per microbatch, a 2-block model)."""
    microbatches, size = (4, 8) if quick else (8, 32)
    with tempfile.TemporaryDirectory(prefix="bigmodel-bench-pp-") as tmp:
        summary = run_bubble(Path(tmp), "1f1b", microbatches, size, quick)
    return Figure(
        name="pipeline_bubble_1f1b",
        title=f"pipeline idle fraction, 1F1B p=2 m={microbatches}: measured / theory (p-1)/(m+p-1)",
        ratio=summary["measured_over_theory"],
        target=1.1,
        direction="<=",
        baseline={"label": "theory", "value": summary["theoretical_bubble"], "unit": "fraction"},
        candidate={"label": "measured", "value": summary["measured_bubble"], "unit": "fraction"},
        command=f"python -m bigmodel.bench.pipeline --microbatches {microbatches} --microbatch-size {size}",
        details={k: v for k, v in summary.items() if k not in ("measured_bubble", "theoretical_bubble")},
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Pipeline bubble: measured idle fraction against (p - 1) / (m + p - 1).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="runs/bench-bubble")
    parser.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b"])
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--microbatch-size", type=int, default=32, help="samples per microbatch (compute per op)")
    parser.add_argument("--width", type=int, default=512, help="width of both towers")
    parser.add_argument("--layers", type=int, default=8, help="blocks per tower (one tower per stage)")
    parser.add_argument("--steps", type=int, default=3, help="steps recorded after 2 warm-up steps (median reported)")
    args = parser.parse_args()
    try:
        summary = run_bubble(
            Path(args.out),
            args.schedule,
            args.microbatches,
            args.microbatch_size,
            False,
            args.width,
            args.layers,
            args.steps,
        )
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
