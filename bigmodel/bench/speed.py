"""Step-time figures on one process: the trainer against a plain PyTorch loop (a), the model against
transformers' CLIPModel of the same dimensions (b), and model FLOPs/s against this machine's matmul peak (c)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bigmodel.bench.common import ROOT, Figure, interleaved, median, paired_ratio
from bigmodel.config import Config, load_config
from bigmodel.config.schema import LossWeights, ModelConfig
from bigmodel.losses import active_objectives, total_loss
from bigmodel.models import MultimodalEncoder, build_model
from bigmodel.models.flops import flops_per_sample
from bigmodel.parallel.parallelize import apply_compile
from bigmodel.train.metrics import measure_matmul_peak

TINY = str(ROOT / "configs" / "tiny.yaml")


# ---------------------------------------------------------------------------------------------------------------
# (a) the trainer against a plain loop


def trainer_config(quick: bool, out_dir: Path) -> Config:
    """One process, fp32: tiny.yaml (quick) or 4+4 blocks of width 256 with 1 fusion block, batch 32."""
    model = [] if quick else [
        "--model.vision_width=256", "--model.vision_heads=4", "--model.vision_mlp_dim=1024", "--model.vision_layers=4",
        "--model.text_width=256", "--model.text_heads=4", "--model.text_mlp_dim=1024", "--model.text_layers=4",
        "--train.global_batch_size=32",
    ]  # fmt: skip
    steps = 2 if quick else 8
    return load_config(TINY, [
        *model, f"--train.steps={steps}", "--train.warmup_steps=1", "--log.progress=false", "--log.wandb=disabled",
        f"--log.every={steps}", "--checkpoint.save_final=false", "--train.eval_every=0", f"--train.out_dir={out_dir}",
    ])  # fmt: skip


def trainer_overhead(quick: bool = False) -> Figure:
    """Seconds per step of `Trainer.fit` (engine, metrics, logging, schedule) over a plain PyTorch loop that runs
    the same model, data loader, loss, clipping and AdamW; both on one process, fp32, interleaved."""
    from bigmodel.data import build_train_loader
    from bigmodel.engines import build_engine
    from bigmodel.optim import build_optimizer
    from bigmodel.parallel.context import setup_parallel
    from bigmodel.train.loop import Trainer
    from bigmodel.train.metrics import NullLogger

    with tempfile.TemporaryDirectory(prefix="bigmodel-bench-") as tmp:
        cfg = trainer_config(quick, Path(tmp))
        ctx = setup_parallel(cfg)
        objectives = active_objectives(cfg.train.loss_weights)
        trainer = Trainer(cfg, ctx, Path(tmp), build_engine(cfg, ctx), build_train_loader(cfg, 0, 1), None,
                          NullLogger())  # fmt: skip
        model = build_model(cfg.model, objectives, cfg.train.seed)
        optimizer = build_optimizer(model, cfg.train)
        loader = build_train_loader(cfg, 0, 1)
        steps = cfg.train.steps

        def plain() -> None:
            batches = iter(loader)
            for _ in range(steps):
                batch = next(batches)
                loss, _ = total_loss(model(batch), cfg.train.loss_weights)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        def bigmodel_trainer() -> None:
            with contextlib.redirect_stderr(io.StringIO()):  # its per-run memory note
                trainer.fit(0)

        times = interleaved({"plain": plain, "trainer": bigmodel_trainer}, repeats=2 if quick else 7)
    return Figure(
        name="trainer_vs_plain_loop",
        title="step time: bigmodel Trainer (1 process) / plain PyTorch loop",
        ratio=paired_ratio(times["trainer"], times["plain"]),
        target=1.03,
        direction="<=",
        baseline={"label": "plain PyTorch loop", "value": median(times["plain"]) / steps, "unit": "s/step"},
        candidate={"label": "bigmodel Trainer.fit", "value": median(times["trainer"]) / steps, "unit": "s/step"},
        command="bigmodel bench --only trainer",
        details={"steps_per_repeat": steps, "seconds": times},
    )


# ---------------------------------------------------------------------------------------------------------------
# (b) against CLIPModel and (c) MFU


@dataclass(frozen=True)
class ClipShape:
    width: int = 512
    layers: int = 6
    heads: int = 8
    batch: int = 32
    image_size: int = 64
    patch_size: int = 8
    tokens: int = 32

    @classmethod
    def for_mode(cls, quick: bool) -> ClipShape:
        return cls(width=64, layers=2, heads=2, batch=8, image_size=32, patch_size=8, tokens=16) if quick else cls()

    def model_config(self) -> ModelConfig:
        """A dual encoder CLIPModel can express: fusion none, causal text, quick GELU, MLP 4 x width."""
        w = self.width
        return ModelConfig(
            image_size=self.image_size, patch_size=self.patch_size, vision_width=w, vision_layers=self.layers,
            vision_heads=self.heads, vision_mlp_dim=4 * w, vocab_size=1024, context_length=self.tokens, text_width=w,
            text_layers=self.layers, text_heads=self.heads, text_mlp_dim=4 * w, text_causal=True, embed_dim=w,
            fusion="none", fusion_layers=0, activation="quick_gelu",
        )  # fmt: skip


def _batch(shape: ClipShape, eos: int = 4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1024, (shape.batch, shape.tokens), generator=generator)
    ids[:, -1] = eos  # full-length captions: both models pool at the last token
    pixels = torch.randn(shape.batch, 3, shape.image_size, shape.image_size, generator=generator)
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids)}


def model_speed(quick: bool = False, precisions: tuple[str, ...] = ("fp32", "bf16")) -> list[Figure]:
    """Per precision: forward + contrastive loss + backward of bigmodel's MultimodalEncoder and of transformers'
    CLIPModel with the same config and weights (b), and bigmodel's model FLOPs/s over the matmul peak of that
    precision measured between its steps (c); each for the eager model and for the model as `train.compile: true`
    runs it (every block compiled by inductor; in quick mode traced by dynamo and run eagerly, which checks the
    plumbing in seconds instead of minutes of C++ compilation). Beside them, the eager model built with
    `model.cpu_fused_kernels: true` against the default one. The optimizer step is not timed: it is the same code
    for both models."""
    from transformers import CLIPModel

    from bigmodel.hf.clip import bigmodel_to_clip_state_dict, clip_config_from_model_config

    shape = ClipShape.for_mode(quick)
    cfg = shape.model_config()
    ours = build_model(cfg, ("contrastive",), seed=0)
    fused = build_model(dataclasses.replace(cfg, cpu_fused_kernels=True), ("contrastive",), seed=0)  # same weights
    compiled = copy.deepcopy(ours)
    apply_compile(compiled, whole_model=False, backend=_compile_backend(quick))
    clip = CLIPModel(clip_config_from_model_config(cfg))
    clip.load_state_dict(bigmodel_to_clip_state_dict(ours.state_dict()), strict=False)
    models = {"clip": clip, "ours": ours, "compiled": compiled, "fused": fused}
    batch = _batch(shape)
    flops = flops_per_sample(cfg, ("contrastive",), text_tokens=shape.tokens)["train"] * shape.batch
    return [f for precision in precisions for f in _compare(models, batch, flops, shape, precision, quick)]


def _compile_backend(quick: bool) -> str:
    return "eager" if quick else "inductor"


def _train_step(model: nn.Module, batch: dict[str, torch.Tensor], precision: str) -> Callable[[], None]:
    """Forward (bf16 autocast or fp32), contrastive loss and backward of bigmodel's model or of CLIPModel."""
    ours = isinstance(model, MultimodalEncoder)
    weights = LossWeights(contrastive=1.0, itm=0.0, mlm=0.0)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(batch) if ours else model(**batch, return_loss=True)
        # bigmodel's loss runs outside autocast, as in the engine; CLIPModel computes its loss inside its forward.
        loss = total_loss(out, weights)[0] if ours else out.loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def _compare(
    models: dict[str, nn.Module], batch: dict[str, torch.Tensor], flops: float, shape: ClipShape, precision: str,
    quick: bool,
) -> list[Figure]:  # fmt: skip
    """Figures (b) and (c) at one precision, for the eager and the compiled model, and the CPU-fused model against
    the eager one; see model_speed."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    steps = {name: _train_step(model, batch, precision) for name, model in models.items()}
    # The first call at a precision compiles (dynamo guards on autocast, so bf16 compiles again): what a user of
    # train.compile waits for before the first step.
    start = time.perf_counter()
    steps["compiled"]()
    compile_seconds = time.perf_counter() - start

    size = 256 if quick else 1024
    peaks: list[float] = []

    def peak() -> None:
        peaks.append(measure_matmul_peak(dtype, torch.device("cpu"), size=size, seconds=0.05 if quick else 0.5))

    times = interleaved(steps | {"peak": peak}, repeats=2 if quick else 7)
    peaks = peaks[-len(times["ours"]) :]  # the warm-up call's peak is not paired with a timed step
    common = {
        "shape": shape.__dict__,
        "seconds": {k: v for k, v in times.items() if k != "peak"},
        "compile_first_step_seconds": compile_seconds,
        "compile_backend": _compile_backend(quick),
    }
    command = f"bigmodel bench --only clip --precision {precision}"
    figures = []
    for name, suffix, label in (
        ("ours", "", "MultimodalEncoder"),
        ("compiled", "_compiled", "MultimodalEncoder, train.compile"),
    ):
        achieved = [flops / t for t in times[name]]
        mfu = [a / p for a, p in zip(achieved, peaks, strict=True)]
        clip_mfu = [flops / t / p for t, p in zip(times["clip"], peaks, strict=True)]
        figures += [
            Figure(
                name=f"model_vs_clip_{precision}{suffix}",
                title=f"step time (forward + backward), {precision}: {label} / transformers CLIPModel",
                ratio=paired_ratio(times[name], times["clip"]),
                target=0.95 if precision == "fp32" else 0.8,
                direction="<=",
                baseline={"label": "CLIPModel", "value": median(times["clip"]), "unit": "s/step"},
                candidate={"label": label, "value": median(times[name]), "unit": "s/step"},
                command=command,
                details=common | {"clip_mfu": median(clip_mfu)},
            ),
            Figure(
                name=f"cpu_mfu_{precision}{suffix}",
                title=f"CPU MFU, {precision}, {label}: model FLOP/s / matmul peak measured in the same run",
                ratio=median(mfu),
                target=0.85 if precision == "fp32" else 0.65,
                direction=">=",
                baseline={"label": f"matmul peak {size}x{size}", "value": median(peaks), "unit": "FLOP/s"},
                candidate={"label": f"{label} (train FLOPs / step time)", "value": median(achieved), "unit": "FLOP/s"},
                command=command,
                details=common | {"train_flops_per_step": flops, "per_repeat_mfu": mfu},
            ),
        ]
    figures.append(
        Figure(
            name=f"cpu_fused_vs_plain_{precision}",
            title=f"step time (forward + backward), {precision}: model.cpu_fused_kernels / the plain modules",
            ratio=paired_ratio(times["fused"], times["ours"]),
            target=1.0,
            direction="<=",
            baseline={"label": "MultimodalEncoder", "value": median(times["ours"]), "unit": "s/step"},
            candidate={
                "label": "MultimodalEncoder, cpu_fused_kernels",
                "value": median(times["fused"]),
                "unit": "s/step",
            },
            command=command,
            details=common,
        )
    )
    return figures
