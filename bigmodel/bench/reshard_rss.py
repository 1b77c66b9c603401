"""Peak memory of the offline checkpoint tools against their streaming bound.

Trains a CLIP-shaped model (fusion none, width 512, 4 + 4 blocks: ~100 MB of fp32 weights, ~300 MB of checkpoint
with AdamW's moments, no tensor above 4 MB) for one step on one process, then runs each tool in a fresh process and
reads that process's peak resident memory (Linux VmHWM, reset after the imports). The bound is the process's
resident memory after importing torch, transformers and bigmodel (measured in the same process, just before the
tool runs, after a warm-up run on a small checkpoint) plus 6x the largest tensor: a tool
that held the model, or even a large part of it, would exceed it several times over. Usage:

    python -m bigmodel.bench.reshard_rss --out runs/bench-rss [--width 512] [--layers 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: import torch, transformers and bigmodel, run the tool once on a small checkpoint (so
# that what it imports lazily and caches on first use is in the baseline), take the baseline, run it on the large
# one and read the peak. Linux: VmRSS is the resident size now, VmHWM its peak; writing 5 to clear_refs resets the
# peak to the current size.
MEASURE = """
import gc, json, sys
import torch, transformers
from bigmodel.checkpoint.tools import consolidate
from bigmodel.hf.convert import export_hf
from bigmodel.checkpoint.reshard import reshard_checkpoint, target_layout

def status(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

def run(tool, src, out):
    if tool == "consolidate":
        consolidate(src, out + "/model.safetensors")
    elif tool == "reshard":
        reshard_checkpoint(src, out, target_layout(src, tp=2, pp=1, dp=2, zero_stage=3), progress=False)
    elif tool == "export-hf":
        export_hf(src, out)

tool, small, large, out = sys.argv[1:5]
run(tool, small, out + "-warmup")
gc.collect()
baseline = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
run(tool, large, out)
print(json.dumps({"baseline": baseline, "peak": status("VmHWM")}))
"""
TOOLS = ("consolidate", "reshard", "export-hf")


def make_checkpoint(out: Path, width: int, layers: int) -> Path:
    """Train the CLIP-shaped model of this width and depth per tower one step on one process; its checkpoint."""
    from bigmodel.config import load_config
    from bigmodel.train.loop import train

    overrides = [
        f"--model.vision_width={width}", f"--model.text_width={width}", "--model.vision_heads=8",
        "--model.text_heads=8", f"--model.vision_mlp_dim={4 * width}", f"--model.text_mlp_dim={4 * width}",
        f"--model.vision_layers={layers}", f"--model.text_layers={layers}", f"--model.embed_dim={width}",
        "--train.steps=1", "--train.warmup_steps=0", "--train.global_batch_size=2", "--data.eval_size=2",
        "--train.eval_batch_size=2", "--log.progress=false", "--log.wandb=disabled", f"--train.out_dir={out}",
    ]  # fmt: skip
    return train(load_config(ROOT / "configs" / "tiny-clip.yaml", overrides)).checkpoint


def largest_tensor_bytes(checkpoint: Path) -> tuple[int, int]:
    """(bytes of the largest tensor, bytes of all tensors) in the checkpoint, model and optimizer state."""
    from bigmodel.checkpoint.safe import read_dcp_metadata

    sizes = [
        meta.size.numel() * meta.properties.dtype.itemsize
        for meta in read_dcp_metadata(checkpoint / ".metadata").state_dict_metadata.values()
        if hasattr(meta, "size")
    ]
    return max(sizes), sum(sizes)


def measure(tool: str, small: Path, large: Path, out: Path) -> dict[str, int]:
    """{"baseline", "peak"} resident bytes of a fresh process running `tool` on `large` (after a warm-up on
    `small`), writing to `out`."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, tool, str(small), str(large), str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


BOUND_MULTIPLE = 6
"""The bound: baseline + BOUND_MULTIPLE x the largest tensor. A tool holds at most the tensor it reads and DCP's read
buffer of it, the slice or copy it writes and a serialisation buffer (4x); the rest is room for the allocator's
fragmentation (glibc keeps freed multi-MB blocks in the heap). Holding the model would take 25x (the test's model)."""


def run(out: Path, width: int = 512, layers: int = 4) -> dict:
    """Build the checkpoints under `out` and measure every tool; the figures in bytes."""
    small = make_checkpoint(out / "small", 64, 1)
    large = make_checkpoint(out / "large", width, layers)
    largest, total = largest_tensor_bytes(large)
    tools = {}
    for tool in TOOLS:
        figures = measure(tool, small, large, out / tool)
        tools[tool] = figures | {"bound": figures["baseline"] + BOUND_MULTIPLE * largest}
    return {"checkpoint_bytes": total, "largest_tensor_bytes": largest, "tools": tools}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="a new folder for the checkpoint and the outputs")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = run(args.out, args.width, args.layers)
    if args.json:
        print(json.dumps(result))
        return
    mib = 2**20
    print(
        f"checkpoint {result['checkpoint_bytes'] / mib:.0f} MiB (model + AdamW state), largest tensor "
        f"{result['largest_tensor_bytes'] / mib:.1f} MiB"
    )
    for tool, f in result["tools"].items():
        print(
            f"{tool:12s} peak RSS {f['peak'] / mib:7.1f} MiB = baseline {f['baseline'] / mib:.1f} + "
            f"{(f['peak'] - f['baseline']) / mib:5.1f} MiB; bound {f['bound'] / mib:.1f} MiB "
            f"(baseline + {BOUND_MULTIPLE} x largest)"
            f" {'OK' if f['peak'] <= f['bound'] else 'EXCEEDED'}"
        )


if __name__ == "__main__":
    main()
