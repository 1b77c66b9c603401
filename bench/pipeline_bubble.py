"""Pipeline bubble: measured idle fraction of one training step against the theory (p - 1) / (m + p - 1).

Trains a model large enough that compute dominates communication (two towers of 6 blocks, width 256) with p = 2
pipeline ranks and m = 8 microbatches, records the timeline of step 3 and prints the measured idle fraction beside
the theory, which assumes stages of equal cost (the towers are made identical so that they are), and beside a
replay of the recorded operations with instant communication (what the stage times alone explain). Writes the run
(with timeline.png and timeline.json) to --out. Usage:

    python bench/pipeline_bubble.py --out runs/bench-bubble [--schedule 1f1b] [--microbatches 8] [--microbatch-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Two identical towers (width 256, 6 blocks each, 17 tokens: 16 patches + class token, captions cut to 17 tokens),
# contrastive objective only: the automatic split puts one tower on each of the 2 ranks, so the stages do equal
# work and the theory's assumption holds. Everything else follows configs/tiny.yaml.
MODEL = [
    "--model.vision_width=256", "--model.vision_heads=4", "--model.vision_mlp_dim=1024", "--model.vision_layers=6",
    "--model.text_width=256", "--model.text_heads=4", "--model.text_mlp_dim=1024", "--model.text_layers=6",
    "--model.context_length=17", "--model.embed_dim=128", "--model.fusion=none", "--model.fusion_layers=0",
    "--train.loss_weights.itm=0", "--train.loss_weights.mlm=0",
]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-bubble")
    parser.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b"])
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--microbatch-size", type=int, default=64, help="samples per microbatch (compute per op)")
    args = parser.parse_args()
    out = Path(args.out)
    train = [
        "--config", str(ROOT / "configs" / "tiny.yaml"), *MODEL,
        "--parallel.pp=2", f"--parallel.pp_schedule={args.schedule}", f"--parallel.microbatches={args.microbatches}",
        f"--train.global_batch_size={args.microbatches * args.microbatch_size}", "--train.steps=4",
        "--log.pp_timeline_step=3", "--log.progress=false", "--log.wandb=disabled", "--checkpoint.save_final=false",
        "--data.eval_size=2", "--train.eval_batch_size=16", f"--train.out_dir={out}",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "bigmodel.train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*cmd, *train], cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stderr[-3000:], file=sys.stderr)
        return result.returncode
    summary = json.loads((out / "timeline_summary.json").read_text())
    ratio = summary["measured_bubble"] / summary["theoretical_bubble"]
    busy = summary["busy_ms_per_rank"]
    print(json.dumps(summary | {"measured_over_theory": ratio, "stage_balance": min(busy) / max(busy)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
