"""The DeepSpeed engine: the same model, data, loss, optimizer and schedule as the native engine, with DeepSpeed's
ZeRO stages 0-3 (optionally offloading optimizer state and, at stage 3, parameters to CPU memory) over all ranks.

DeepSpeed's config is generated from bigmodel's (`deepspeed_config`), so both engines train alike: torch's AdamW
(bigmodel's two parameter groups) as the client optimizer, bigmodel's warmup + cosine LambdaLR as the client
schedule, clipping and accumulation set explicitly, bf16 as torch autocast with fp32 weights and fp32 reductions.
A user's ds_config.json (`deepspeed.config_file`) is merged over it. Checkpoints are DeepSpeed's own files with
bigmodel's manifest beside them (bigmodel.checkpoint.deepspeed).

This module imports deepspeed only when an engine is built, so configs can be checked without it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bigmodel.config.errors import ConfigError
from bigmodel.config.schema import Config
from bigmodel.engines.base import Engine, StepStats
from bigmodel.losses import active_objectives, total_loss
from bigmodel.optim import build_optimizer, build_scheduler
from bigmodel.parallel.context import ParallelContext
from bigmodel.parallel.env import DistEnv

# DeepSpeed keys whose value bigmodel derives from its own config: a user's JSON may repeat them, not change them.
# Each maps to the bigmodel field to change instead.
OWNED_KEYS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.global_batch_size / train.grad_accum",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "zero_optimization.stage": "parallel.zero_stage",
    "zero_optimization.offload_optimizer.device": "deepspeed.offload_optimizer",
    "zero_optimization.offload_param.device": "deepspeed.offload_param",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "torch_autocast.enabled": "train.precision",
    "torch_autocast.dtype": "train.precision",
}
REFUSED_SECTIONS = {
    "optimizer": "bigmodel passes torch AdamW built from train.lr, train.beta1/beta2, train.eps, train.weight_decay",
    "scheduler": "bigmodel passes its warmup + cosine schedule built from train.warmup_steps and train.min_lr_ratio",
    "pipeline": "the deepspeed engine does not run pipelines; use engine=native for parallel.pp > 1",
}


def generated_config(cfg: Config) -> dict[str, Any]:
    """DeepSpeed's config for `cfg` before a user's JSON is merged in: every value that changes the arithmetic set
    explicitly (DeepSpeed's own defaults differ, e.g. gradient_clipping 1.0), buckets sized for CPU memory."""
    t, p, d = cfg.train, cfg.parallel, cfg.deepspeed
    dp = p.dp_replicate * p.dp_shard
    bf16 = t.precision == "bf16"
    zero: dict[str, Any] = {
        "stage": p.zero_stage,
        "reduce_bucket_size": d.bucket_size,
        "allgather_bucket_size": d.bucket_size,
        "overlap_comm": False,
        "contiguous_gradients": True,
    }
    if p.zero_stage == 3:
        zero |= {
            "stage3_prefetch_bucket_size": d.bucket_size,
            "stage3_param_persistence_threshold": d.param_persistence_threshold,
            "stage3_gather_16bit_weights_on_model_save": False,
        }
    if p.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu" if d.offload_optimizer else "none"}
    if p.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu" if d.offload_param else "none"}
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.global_batch_size // (t.grad_accum * dp),
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        # bigmodel's bf16 is autocast over fp32 weights, gradients, reductions and optimizer state (as in the native
        # engine); an empty module list keeps DeepSpeed from reducing Linear/Conv gradients in bf16.
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "torch_autocast": {"enabled": bf16, "dtype": "bfloat16", "lower_precision_safe_modules": []},
        # torch.optim.AdamW with the optimizer state in CPU memory: DeepSpeed would insist on its C++ CPU Adam.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_dicts else value
    return merged


def read_user_config(path: str) -> dict[str, Any]:
    """The JSON object in `path`; ConfigError (one line) if it is missing or not a JSON object."""
    try:
        user = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.config_file={path} does not exist; fix the path or leave it empty") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed.config_file={path} is not valid JSON ({err}); fix the file") from None
    if not isinstance(user, dict):
        raise ConfigError(f"deepspeed.config_file={path} must hold a JSON object; it holds a {type(user).__name__}")
    return user


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed config this run uses: `generated_config(cfg)` with `deepspeed.config_file` merged over it.

    Raises ConfigError (one line naming both values and the fix) if the JSON changes a value bigmodel owns
    (OWNED_KEYS) or brings an optimizer, scheduler or pipeline section.
    """
    generated = generated_config(cfg)
    if not cfg.deepspeed.config_file:
        return generated
    path = cfg.deepspeed.config_file
    user = read_user_config(path)
    for section, reason in REFUSED_SECTIONS.items():
        if section in user:
            raise ConfigError(f"deepspeed.config_file={path} has a {section!r} section; remove it ({reason})")
    ours, theirs = _flatten(generated), _flatten(user)
    for key, field in OWNED_KEYS.items():
        if key in theirs and key in ours and theirs[key] != ours[key]:
            raise ConfigError(
                f"deepspeed.config_file={path} sets {key}={theirs[key]!r} but bigmodel's config gives "
                f"{ours[key]!r} (from {field}); remove {key} from the JSON or change {field}"
            )
        if key in theirs and key not in ours and theirs[key] not in (False, "none", None):
            raise ConfigError(
                f"deepspeed.config_file={path} sets {key}={theirs[key]!r}, which this layout does not use "
                f"(from {field}); remove it from the JSON or change {field}"
            )
    return _merge(generated, user)


def _quiet_deepspeed() -> None:
    """DeepSpeed logs its whole config and every step at INFO on every rank; keep warnings and errors."""
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def _skip_inference_all_reduce_build() -> None:
    """DeepSpeed's communication backend compiles a shared-memory all-reduce at start-up (about 46 s of C++ on a
    machine without a cached build). Only DeepSpeed's inference uses it (inference_all_reduce); training's
    collectives are torch.distributed's. Marking the op unavailable skips the build."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _ensure_process_group(env: DistEnv) -> None:
    """DeepSpeed needs torch.distributed and the launcher's variables even for one process started without a
    launcher: say them (from bigmodel's reading of the environment) and join a private one-process group."""
    for name, value in (("RANK", env.rank), ("LOCAL_RANK", env.local_rank), ("WORLD_SIZE", env.world_size)):
        os.environ.setdefault(name, str(value))
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


class DeepSpeedEngine(Engine):
    """Training under `deepspeed.initialize` with data parallelism over every rank (parallel.dp_shard) at
    parallel.zero_stage 0-3. Tensor and pipeline parallelism are the native engine's (config validation refuses
    them here).

    Every rank builds the whole model from the seed (identical weights, as in every layout) before DeepSpeed
    partitions it, so a rank briefly holds the whole fp32 model once.
    """

    def __init__(self, cfg: Config, ctx: ParallelContext):
        try:
            import deepspeed
        except ImportError:
            raise ImportError(
                "engine=deepspeed needs the deepspeed package: pip install 'bigmodel[deepspeed]'"
            ) from None
        from bigmodel.models import build_model

        _quiet_deepspeed()
        _skip_inference_all_reduce_build()
        _ensure_process_group(ctx.env)
        self.cfg = cfg
        self.ctx = ctx
        self.device = ctx.device
        self.ds_config = deepspeed_config(cfg)
        model = build_model(cfg.model, active_objectives(cfg.train.loss_weights), cfg.train.seed, ctx.device)
        model.set_activation_checkpointing(cfg.train.activation_checkpointing)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=build_optimizer(model, cfg.train),
            lr_scheduler=lambda optimizer: build_scheduler(optimizer, cfg.train),
            config=self.ds_config,
        )
        self.model = self.ds.module
        self.memory: dict[str, int] | None = None

    def train_step(self, microbatches: Sequence[dict[str, torch.Tensor]], capture_grads: bool = False) -> StepStats:
        """One optimizer step over this rank's share of each microbatch; every rank calls it.

        DeepSpeed divides each loss by the accumulation steps and steps the optimizer and the schedule after the
        last microbatch; its gradient norm is taken before clipping, as the native engine reports it.
        """
        if len(microbatches) != self.ds.gradient_accumulation_steps():
            raise ValueError(
                f"got {len(microbatches)} microbatches, DeepSpeed accumulates "
                f"{self.ds.gradient_accumulation_steps()} (train.grad_accum)"
            )
        self.ds.train()
        weights = self.cfg.train.loss_weights
        sums: dict[str, torch.Tensor] = {}
        grads: dict[str, torch.Tensor] = {}
        norm = None
        lr = self.ds.get_lr()[0]
        for i, batch in enumerate(microbatches):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            outputs = self.ds(batch)
            loss, parts = total_loss(outputs, weights, self.ctx.dp_group)
            self.ds.backward(loss)
            if i == len(microbatches) - 1:
                if capture_grads:
                    grads = self.full_gradients()
                if self.memory is None:
                    grad_bytes = self.gradient_bytes()
                if not self.ds.zero_optimization():
                    # ZeRO-0 clips with torch's clip_grad_norm_ and keeps no norm: take it from the averaged grads.
                    norm = torch.nn.utils.get_total_norm(
                        [p.grad for p in self.model.parameters() if p.grad is not None]
                    )
            self.ds.step()
            for name, value in {"loss": loss.detach(), **parts}.items():
                sums[name] = sums.get(name, 0.0) + value.float()
        if self.memory is None:
            self.memory = self.model_state_bytes() | {"grads": grad_bytes}
        means = self.mean_over_data_parallel(sums, len(microbatches))
        grad_norm = norm if not self.ds.zero_optimization() else self.ds.get_global_grad_norm()
        return StepStats(
            loss=means.pop("loss"),
            parts=means,
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            lr=lr,
            logit_scale=self.logit_scale(),
            grads=grads,
        )

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Whole, data-parallel-averaged gradients by parameter name, after the last backward of a step and before
        clipping (a collective at ZeRO 1-3: every rank calls it)."""
        from deepspeed.utils import safe_get_full_grad

        return {name: safe_get_full_grad(p).detach().float().clone() for name, p in self.model.named_parameters()}

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Whole fp32 parameters by name (the optimizer's master copy under ZeRO; a collective at stage 3)."""
        from deepspeed.utils import safe_get_full_fp32_param

        full = {}
        for name, param in self.model.named_parameters():
            value = safe_get_full_fp32_param(param)
            full[name] = (param if value is None else value).detach().float().clone()
        return full

    def logit_scale(self) -> float | None:
        head = getattr(self.model, "contrastive", None)
        if head is None:
            return None
        from deepspeed.utils import safe_get_full_fp32_param

        value = safe_get_full_fp32_param(head.logit_scale)
        value = head.logit_scale if value is None else value
        return value.detach().float().exp().item()

    @torch.no_grad()
    def forward_eval(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every rank runs the same batch (ZeRO-3 gathers parameters collectively)."""
        self.ds.eval()
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return self.ds(batch)

    def gradient_bytes(self) -> int:
        """Bytes of this rank's gradients after backward: whole gradients held by the parameters (stages 0-1) and
        the ZeRO optimizer's gradient partitions (stages 1-3)."""
        tensors = [p.grad for p in self.model.parameters() if p.grad is not None]
        zero = self.ds.optimizer if self.ds.zero_optimization() else None
        for attr in ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer"):
            found = getattr(zero, attr, None)
            if isinstance(found, dict):
                tensors += [t for value in found.values() for t in (value if isinstance(value, list) else [value])]
            elif isinstance(found, list):
                tensors += [t for value in found for t in (value if isinstance(value, list) else [value])]
            elif torch.is_tensor(found):
                tensors.append(found)
        return _unique_bytes(t for t in tensors if torch.is_tensor(t))

    def model_state_bytes(self) -> dict[str, int]:
        """This rank's bytes of parameters (its ZeRO-3 partition, or whole) and of optimizer state: the moments
        plus the fp32 master partitions a ZeRO optimizer keeps beside the parameters."""
        params = [getattr(p, "ds_tensor", p) for p in self.model.parameters()]
        basic = self.ds.optimizer.optimizer if self.ds.zero_optimization() else self.ds.optimizer
        module_storage = {t.untyped_storage().data_ptr() for t in params}
        optimizer = [t for state in basic.state.values() for t in state.values() if torch.is_tensor(t)]
        optimizer += [
            t
            for group in basic.param_groups
            for t in group["params"]
            if t.untyped_storage().data_ptr() not in module_storage
        ]
        return {"params": _unique_bytes(params), "optimizer": _unique_bytes(optimizer)}

    def save_checkpoint(self, path: Path, extra: dict[str, Any], on_complete=None) -> Path:
        """DeepSpeed's checkpoint of this engine in the folder `path`, with bigmodel's manifest (every rank)."""
        from bigmodel.checkpoint.deepspeed import save_deepspeed

        return save_deepspeed(path, self, extra, on_complete)

    def load_checkpoint(self, path: Path, checked: Collection[str] = ()) -> dict[str, Any]:
        """Load a checkpoint this engine saved (same layout) and return its `extra` (every rank). `checked`: files
        whose checksums are checked first (DeepSpeed's loader reads its files itself)."""
        from bigmodel.checkpoint.deepspeed import load_deepspeed
        from bigmodel.checkpoint.sharded import verify_manifest

        verify_manifest(path, checked, unlisted=False)
        return load_deepspeed(path, self)


def _unique_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t.numel():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
