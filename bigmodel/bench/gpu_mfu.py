"""GPU MFU of a ~0.5B-parameter encoder in bf16, with a correctness check against an fp32 reference.

    python -m bigmodel.bench.gpu_mfu --out runs/gpu_mfu.json                      # one H200 (or any CUDA GPU)
    python -m bigmodel.bench.gpu_mfu --device cpu --tiny --out runs/gpu_mfu.json  # the same script on a CPU, tiny model

1. Correctness: the model (contrastive dual encoder, fusion none) runs the same batch in fp32 (TF32 off) and under
   bf16 autocast from the same weights. bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.2% per op); through
   tens of blocks that grows to about 1% on the loss, so the check is: loss within 2e-2 relative, and every image
   and text embedding within cosine similarity 0.99 of the fp32 one. A wrong cast or a broken kernel moves them far
   more (random embeddings have cosine ~0).
2. Speed: --steps timed training steps (forward, loss, backward, AdamW) after --warmup, bf16 autocast. MFU = model
   FLOPs per step (bigmodel.models.flops, forward + backward) / step time / peak: over the H200's dense bf16 peak
   (989 TFLOP/s) and over a bf16 matmul peak measured in the same run (8192^3 matmuls; CPU: 1024^3).
Writes one JSON with both, the configuration and the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bigmodel.config.schema import LossWeights, ModelConfig
from bigmodel.losses import total_loss
from bigmodel.models import build_model
from bigmodel.models.flops import count_parameters, flops_per_sample

H200_BF16_DENSE_PEAK = 989e12
LOSS_RTOL = 2e-2
MIN_COSINE = 0.99
OBJECTIVES = ("contrastive",)


def model_config(tiny: bool) -> ModelConfig:
    """~0.5B parameters (ViT-L-sized image tower at 224 px / patch 14, 12-layer 1024-wide text tower), or tiny."""
    if tiny:
        return ModelConfig(image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2,
                           vision_mlp_dim=256, vocab_size=512, context_length=16, text_width=64, text_layers=2,
                           text_heads=2, text_mlp_dim=256, text_causal=True, embed_dim=64, fusion="none",
                           fusion_layers=0)  # fmt: skip
    return ModelConfig(image_size=224, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
                       vision_mlp_dim=4096, vocab_size=49408, context_length=77, text_width=1024, text_layers=12,
                       text_heads=16, text_mlp_dim=4096, text_causal=True, embed_dim=768, fusion="none",
                       fusion_layers=0)  # fmt: skip


def make_batch(cfg: ModelConfig, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, cfg.vocab_size, (batch, cfg.context_length), generator=generator)
    pixels = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=generator)
    out = {"pixel_values": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {k: v.to(device) for k, v in out.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def correctness(model, batch, device: torch.device) -> dict[str, float | bool]:
    """fp32 (TF32 off) against bf16 autocast on the same weights and batch."""
    weights = LossWeights(contrastive=1.0, itm=0.0, mlm=0.0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        ref = model(batch)
        ref_loss = total_loss(ref, weights)[0].item()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            low = model(batch)
            low_loss = total_loss(low, weights)[0].item()
    cosines = [
        torch.nn.functional.cosine_similarity(low[k].float(), ref[k].float(), dim=-1).min().item()
        for k in ("image_embeds", "text_embeds")
    ]
    loss_rel = abs(low_loss - ref_loss) / abs(ref_loss)
    return {
        "loss_fp32": ref_loss,
        "loss_bf16": low_loss,
        "loss_rel_diff": loss_rel,
        "min_embedding_cosine": min(cosines),
        "passed": loss_rel <= LOSS_RTOL and min(cosines) >= MIN_COSINE,
    }


def matmul_peak(device: torch.device, size: int, repeats: int) -> float:
    """bf16 dense matmul FLOP/s on this device, measured now."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def time_steps(model, batch, device: torch.device, warmup: int, steps: int) -> list[float]:
    weights = LossWeights(contrastive=1.0, itm=0.0, mlm=0.0)
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **fused)
    times = []
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(batch)
        total_loss(out, weights)[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def run(device: str, tiny: bool, batch_size: int, warmup: int, steps: int) -> dict:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; use --device cpu --tiny")
    cfg = model_config(tiny)
    model = build_model(cfg, OBJECTIVES, seed=0, device=dev)
    batch = make_batch(cfg, batch_size, dev)
    check = correctness(model, batch, dev)
    times = time_steps(model, batch, dev, warmup, steps)
    size, repeats = (8192, 50) if dev.type == "cuda" else (1024, 5)
    peak = matmul_peak(dev, size, repeats)
    step = sorted(times)[len(times) // 2]
    flops = flops_per_sample(cfg, OBJECTIVES)["train"] * batch_size
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "parameters": count_parameters(cfg, OBJECTIVES)["total"],
        "batch_size": batch_size,
        "train_flops_per_step": flops,
        "step_seconds": times,
        "median_step_seconds": step,
        "achieved_flops": flops / step,
        "mfu_vs_h200_bf16_peak": flops / step / H200_BF16_DENSE_PEAK,
        "measured_bf16_matmul_peak": peak,
        "mfu_vs_measured_peak": flops / step / peak,
        "correctness": check | {"loss_rtol": LOSS_RTOL, "min_cosine": MIN_COSINE},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (CPU check of the script)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 (tiny: 4)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="runs/gpu_mfu.json")
    args = parser.parse_args(argv)
    batch = args.batch_size or (4 if args.tiny else 128)
    result = run(args.device, args.tiny, batch, args.warmup, args.steps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "step_seconds"}, indent=1))
    return 0 if result["correctness"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
