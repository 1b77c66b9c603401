"""The DeepSpeed engine: the same model, data, loss, optimizer and schedule as the native engine, with DeepSpeed's
ZeRO stages 0-3 (optionally offloading optimizer state and, at stage 3, parameters to CPU memory) over all ranks.

DeepSpeed's config is generated from bigmodel's (`bigmodel.config.deepspeed.deepspeed_config`), so both engines
train alike: torch's AdamW (bigmodel's two parameter groups) as the client optimizer, bigmodel's warmup + cosine
LambdaLR as the client schedule, clipping and accumulation set explicitly, bf16 as torch autocast with fp32 weights
and fp32 reductions. A user's ds_config.json (`deepspeed.config_file`) is merged over it. Checkpoints are
DeepSpeed's own files with bigmodel's manifest beside them (`save_checkpoint`; bigmodel.checkpoint.deepspeed
describes the folder and converts it).

This module imports deepspeed only when an engine is built, so configs can be checked without it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bigmodel.checkpoint.deepspeed import FORMAT as DEEPSPEED_FORMAT
from bigmodel.checkpoint.io import Purger
from bigmodel.checkpoint.manifest import MANIFEST_FILE, read_manifest, require_fields, verify_manifest
from bigmodel.checkpoint.run import point_latest, step_folder
from bigmodel.checkpoint.sharded import PendingSave, start_save
from bigmodel.config.deepspeed import deepspeed_config
from bigmodel.config.schema import Config
from bigmodel.engines.accumulation import microbatch_losses
from bigmodel.engines.base import Engine, StepStats
from bigmodel.losses import active_objectives
from bigmodel.optim import build_optimizer, build_scheduler
from bigmodel.parallel.context import ParallelContext
from bigmodel.parallel.env import DistEnv


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
        from bigmodel.models.locking import lock_towers

        _quiet_deepspeed()
        _skip_inference_all_reduce_build()
        _ensure_process_group(ctx.env)
        self.cfg = cfg
        self.ctx = ctx
        self.device = ctx.device
        self.ds_config = deepspeed_config(cfg)
        model = build_model(cfg.model, active_objectives(cfg.train.loss_weights), cfg.train.seed, ctx.device)
        # Before initialize: DeepSpeed's ZeRO partitions the optimizer's parameters, which build_optimizer takes
        # from requires_grad (frozen parameters get no gradient buffer and no optimizer state).
        lock_towers(model, cfg.train)
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

        The losses come divided for accumulation (bigmodel.engines.accumulation, naive or cached), so DeepSpeed does
        not divide them again; it steps the optimizer and the schedule after the last microbatch. Its gradient norm
        is taken before clipping, as the native engine reports it.
        """
        if len(microbatches) != self.ds.gradient_accumulation_steps():
            raise ValueError(
                f"got {len(microbatches)} microbatches, DeepSpeed accumulates "
                f"{self.ds.gradient_accumulation_steps()} (train.grad_accum)"
            )
        self.ds.train()

        def forward(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return self.ds({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})

        logged: dict[str, torch.Tensor] = {}
        grads: dict[str, torch.Tensor] = {}
        norm = None
        lr = self.ds.get_lr()[0]
        losses = microbatch_losses(forward, microbatches, self.cfg.train, self.ctx.dp_group, self.device, logged)
        for i, loss in enumerate(losses):
            self.ds.backward(loss, scale_wrt_gas=False)  # already divided as the accumulation needs
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
        if self.memory is None:
            self.memory = self.model_state_bytes() | {"grads": grad_bytes}
        means = self.mean_over_data_parallel(logged, 1)
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
        """Whole, data-parallel-averaged gradients of the trainable parameters by name (frozen ones have none), after
        the last backward of a step and before clipping (a collective at ZeRO 1-3: every rank calls it)."""
        from deepspeed.utils import safe_get_full_grad

        return {
            name: safe_get_full_grad(p).detach().float().clone()
            for name, p in self.model.named_parameters()
            if p.requires_grad
        }

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Whole fp32 parameters by name (the optimizer's master copy under ZeRO; a collective at stage 3)."""
        from deepspeed.runtime.zero import GatheredParameters
        from deepspeed.utils import safe_get_full_fp32_param

        full = {}
        for name, param in self.model.named_parameters():
            if not param.requires_grad:  # frozen: in no optimizer, so the module's copy (gathered at ZeRO-3) is all
                with GatheredParameters([param]):
                    full[name] = param.detach().float().clone()
                continue
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

    def save_checkpoint(
        self,
        run_dir: Path,
        step: int,
        extra: dict[str, Any],
        keep: int,
        async_: bool = False,
        group: dist.ProcessGroup | None = None,
        purger: Purger | None = None,
    ) -> PendingSave:
        """DeepSpeed's checkpoint of this engine in the run's step folder, with bigmodel's manifest (every rank). As
        with the sharded format, the files go to `.tmp_<name>` beside it, which rank 0 renames once every rank is
        done, then points `latest` at it. DeepSpeed writes synchronously: `async_` and `group` do not apply."""
        import deepspeed

        if async_:
            raise ValueError("DeepSpeed writes its checkpoints synchronously; set checkpoint.async_save=false")
        tag = f"global_step{step}"
        manifest = {
            "format": DEEPSPEED_FORMAT,
            "step": step,
            "extra": extra | {"step": step},
            "layout": asdict(self.ctx.dims),
            "world_size": dist.get_world_size(),
            "torch": torch.__version__,
            "deepspeed": {
                "version": deepspeed.__version__,
                "tag": tag,
                "zero_stage": self.ds.zero_optimization_stage(),
            },
        }
        pending = start_save(step_folder(run_dir, step), manifest, point_latest(keep, purger), purger)
        self.ds.save_checkpoint(str(pending.tmp), tag=tag, save_latest=True)  # ends with a barrier
        pending.finish()
        dist.barrier()
        pending.wait()
        return pending

    def load_checkpoint(self, path: Path, checked: Collection[str] = ()) -> dict[str, Any]:
        """Load a checkpoint this engine saved and return its `extra` (every rank). `checked`: files whose checksums
        are checked first (DeepSpeed's loader reads its files itself). DeepSpeed restores its partitions only into
        the layout that saved them, so another process count or ZeRO stage is a one-line ValueError that names the
        conversion to use instead."""
        verify_manifest(path, checked, unlisted=False)
        manifest = read_manifest(path, "extra")
        if manifest.get("format") != DEEPSPEED_FORMAT:
            raise ValueError(
                f"checkpoint {path} was written by the native engine (format {manifest.get('format')}); "
                "engine=deepspeed resumes only its own checkpoints: resume it with engine=native"
            )
        manifest = read_manifest(path, "world_size", "deepspeed")
        saved = require_fields(manifest["deepspeed"], ("tag", "zero_stage"), f"{path / MANIFEST_FILE}'s deepspeed")
        here = (dist.get_world_size(), self.ds.zero_optimization_stage())
        if (manifest["world_size"], saved["zero_stage"]) != here:
            raise ValueError(
                f"checkpoint {path} was saved by {manifest['world_size']} processes at ZeRO-{saved['zero_stage']}, "
                f"this run has {here[0]} at ZeRO-{here[1]}; resume it in the layout that saved it, or convert it with "
                "`bigmodel ckpt from-deepspeed` and resume the result with engine=native in any layout"
            )
        tag = saved["tag"]
        loaded, _ = self.ds.load_checkpoint(
            str(path), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise ValueError(f"checkpoint {path}: DeepSpeed found no checkpoint {tag} in it; use an earlier checkpoint")
        return manifest["extra"]


def _unique_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t.numel():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
