"""Data parallelism with ZeRO stages 0, 1 and 2 over the data-parallel process group (stage 3 is FSDP2, fsdp.py).

Every data-parallel rank holds the whole model (or its tensor-parallel shard: a DTensor parameter is handled through
its local tensor, and sharded or reduced only across the data-parallel group). After the last microbatch's backward,
`ZeroOptimizer.sync_gradients` averages the gradients over the group:

- stage 0: all-reduce every gradient; AdamW updates the whole parameters.
- stage 1: the same all-reduce; AdamW state is sharded: rank r owns the r-th contiguous chunk of every parameter's
  flattened local tensor (chunks of ceil(numel / dp) elements, the last ones padded or empty) and updates only that
  chunk; `step` all-gathers the updated chunks into every rank's parameters.
- stage 2: as stage 1, but the gradients are reduce-scattered into the owned chunks and the full gradients freed.

The all-reduce, reduce-scatter and all-gather are torch's; with `gloo_transport` (parallel.gloo_transport) they go
through `bigmodel.parallel.gloo.collectives` instead (shared memory between the ranks of a host; docs/parallelism.md).

AdamW holds each owned chunk as an nn.Parameter that is a view into the model parameter's storage, so there is no
second copy of the weights and ZeRO's memory accounting holds (bigmodel/parallel/memory.py). Collectives run on
buckets of parameters (about `bucket_mb` of gradient each) rather than one per tensor; gloo has no average, so
gradients are summed and then divided by dp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from bigmodel.config.schema import TrainConfig
from bigmodel.optim import decays
from bigmodel.parallel.collectives import TORCH
from bigmodel.parallel.gloo.collectives import TRANSPORT as GLOO_TRANSPORT
from bigmodel.parallel.grad_norm import GradPiece, as_grad_piece, clip_grad_norm_, split_groups

ZeroStage = Literal[0, 1, 2]


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor this rank stores: a DTensor's local shard, a plain tensor itself. Shares storage with `tensor`."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@dataclass
class _Slot:
    """One parameter: its chunking over the data-parallel ranks and the chunk this rank owns."""

    name: str
    param: nn.Parameter
    """The model's parameter (a DTensor under tensor parallelism)."""
    numel: int
    """Elements of its local tensor."""
    chunk: int
    """Elements per rank: ceil(numel / dp) for stages 1 and 2, numel for stage 0 (no sharding)."""
    start: int
    """Where this rank's chunk starts in the flattened local tensor (rank * chunk, at most numel)."""
    owned: nn.Parameter
    """This rank's chunk of the flattened local tensor (elements [start, start + chunk), clipped to numel, possibly
    empty): a view into the parameter's storage, and what AdamW updates."""
    offset: int = 0
    """Where its chunk starts in its bucket's per-rank segment."""


@dataclass
class _Bucket:
    slots: list[_Slot]
    size: int
    """Elements per rank: the sum of its slots' chunks."""
    grads: torch.Tensor | None = None
    """Stage 2 after sync_gradients: this rank's averaged chunks, `size` elements; owned grads are views into it."""


class ZeroOptimizer:
    """AdamW for a data-parallel model, with ZeRO stage 0, 1 or 2 (see the module docstring).

    Per step, every data-parallel rank calls, in order: forward and backward of each microbatch (loss divided by the
    number of microbatches, as the single-process engine does), `sync_gradients()`, `clip_grad_norm_(max_norm)`,
    `step()`, `zero_grad()`. An LR scheduler drives the wrapped `optimizer` (a torch AdamW), e.g.
    `build_scheduler(zero.optimizer, cfg)`. Hyper-parameters and the decay / no-decay split are those of
    `bigmodel.optim.build_optimizer`, so a run matches the single-process engine.

    Build it once the model is in its final layout (tensor parallel applied, materialised on its device): AdamW
    holds views into the parameters' storage, so replacing a parameter's data afterwards (`model.to(...)`,
    `load_state_dict(..., assign=True)`) would detach it from the optimizer. In-place loads are fine.
    `dp_mesh` is `Meshes.dp` (1-D); every rank of it constructs the optimizer with the same model.
    `gloo_transport` (parallel.gloo_transport) moves the buckets by `bigmodel.parallel.gloo.collectives`.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        dp_mesh: DeviceMesh,
        stage: ZeroStage,
        bucket_mb: float = 25.0,
        gloo_transport: bool = False,
    ):
        if stage not in (0, 1, 2):
            raise ValueError(f"ZeroOptimizer implements ZeRO stages 0, 1 and 2, got {stage}; stage 3 is apply_fsdp")
        self.stage = stage
        self.group = dp_mesh.get_group()
        self.dp = dp_mesh.size()
        self.rank = dp_mesh.get_local_rank()
        self.collectives = GLOO_TRANSPORT if gloo_transport else TORCH
        self.slots = [self._slot(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if len({s.param.dtype for s in self.slots}) > 1:
            raise ValueError("ZeroOptimizer buckets gradients of one dtype; keep every parameter fp32 (use autocast)")
        self.buckets = self._buckets(bucket_mb * 2**20)
        groups = [
            {"params": [s.owned for s in self.slots if decays(s.name, s.param)], "weight_decay": cfg.weight_decay},
            {"params": [s.owned for s in self.slots if not decays(s.name, s.param)], "weight_decay": 0.0},
        ]
        # foreach=False: the same per-element arithmetic as the single-process optimizer (build_optimizer).
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False)

    @torch.no_grad()
    def _slot(self, name: str, param: nn.Parameter) -> _Slot:
        local = local_tensor(param).detach()
        if not local.is_contiguous():
            raise ValueError(f"parameter {name} is not contiguous; ZeroOptimizer shards its flattened storage")
        numel = local.numel()
        chunk = numel if self.stage == 0 else math.ceil(numel / self.dp)
        start = 0 if self.stage == 0 else min(self.rank * chunk, numel)
        end = min(start + chunk, numel)
        return _Slot(name, param, numel, chunk, start, nn.Parameter(local.view(-1)[start:end]))

    def _buckets(self, cap_bytes: float) -> list[_Bucket]:
        """Consecutive parameters, about `cap_bytes` of whole local gradient per bucket."""
        buckets: list[_Bucket] = []
        full_bytes = 0
        for slot in self.slots:
            slot_bytes = slot.chunk * (1 if self.stage == 0 else self.dp) * slot.param.element_size()
            if not buckets or full_bytes + slot_bytes > cap_bytes:
                buckets.append(_Bucket([], 0))
                full_bytes = 0
            slot.offset = buckets[-1].size
            buckets[-1].slots.append(slot)
            buckets[-1].size += slot.chunk
            full_bytes += slot_bytes
        return buckets

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped AdamW's groups (lr, weight_decay, ...), as on a torch optimizer."""
        return self.optimizer.param_groups

    @torch.no_grad()
    def sync_gradients(self) -> None:
        """Average the gradients over the data-parallel group (all-reduce, or reduce-scatter into the owned chunks
        for stage 2) and hand AdamW its chunks. A collective: call once per step, after the last backward."""
        for bucket in self.buckets:
            if self.stage == 2:
                self._reduce_scatter(bucket)
            else:
                self._all_reduce(bucket)

    def _local_grad(self, slot: _Slot) -> torch.Tensor:
        """The local gradient of `slot`'s parameter, created as zeros if backward left none (an unused parameter)."""
        if slot.param.grad is None:
            slot.param.grad = torch.zeros_like(slot.param)
        grad = local_tensor(slot.param.grad)
        if not grad.is_contiguous():
            raise ValueError(f"the gradient of {slot.name} is not contiguous; ZeroOptimizer needs flat gradients")
        return grad

    def _all_reduce(self, bucket: _Bucket) -> None:
        grads = [self._local_grad(slot) for slot in bucket.slots]
        flat = _flatten_dense_tensors(grads)
        self.collectives.all_reduce_sum(flat, self.group)
        flat.div_(self.dp)
        for slot, grad, averaged in zip(bucket.slots, grads, _unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(averaged)
            slot.owned.grad = grad.view(-1)[slot.start : slot.start + slot.owned.numel()]

    def _reduce_scatter(self, bucket: _Bucket) -> None:
        # (dp, size): row r holds, for each slot, rank r's chunk of its gradient, padded to `chunk` elements.
        send = torch.empty(self.dp, bucket.size, dtype=self.slots[0].param.dtype, device=self.slots[0].param.device)
        for slot in bucket.slots:
            grad = self._local_grad(slot).view(-1)
            padded = F.pad(grad, (0, self.dp * slot.chunk - slot.numel))
            send[:, slot.offset : slot.offset + slot.chunk].copy_(padded.view(self.dp, slot.chunk))
            slot.param.grad = None  # the whole gradient is not needed any more
        bucket.grads = send.new_empty(bucket.size)
        self.collectives.reduce_scatter_sum(bucket.grads, send.view(-1), self.group)
        bucket.grads.div_(self.dp)
        for slot in bucket.slots:
            slot.owned.grad = bucket.grads[slot.offset : slot.offset + slot.owned.numel()]

    def grad_pieces(self) -> list[GradPiece]:
        """The gradients after sync_gradients, as the norm sees them: whole (replicated over dp) for stages 0 and 1,
        this rank's chunks (split over dp, and over tp where the parameter is tensor-parallel) for stage 2."""
        if self.stage < 2:
            return [as_grad_piece(slot.param.grad) for slot in self.slots]
        return [
            GradPiece(
                slot.owned.grad,
                (self.group, *split_groups(slot.param)) if isinstance(slot.param, DTensor) else (self.group,),
            )
            for slot in self.slots
        ]

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, pipeline_group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """Clip the synced gradients to a global L2 norm of `max_norm` (0: no clipping) and return the norm before
        clipping; the same on every rank. A collective over the dp and tp groups (and `pipeline_group`, whose other
        stages hold the rest of the model)."""
        return clip_grad_norm_(self.grad_pieces(), max_norm, pipeline_group)

    @torch.no_grad()
    def step(self) -> None:
        """Update the owned chunks, then (stages 1 and 2) all-gather them into every rank's parameters."""
        self.optimizer.step()
        if self.stage > 0:
            for bucket in self.buckets:
                self._all_gather_params(bucket)

    def _all_gather_params(self, bucket: _Bucket) -> None:
        send = torch.zeros(bucket.size, dtype=self.slots[0].param.dtype, device=self.slots[0].param.device)
        for slot in bucket.slots:
            send[slot.offset : slot.offset + slot.owned.numel()].copy_(slot.owned)
        gathered = self._all_gather(send)
        for slot in bucket.slots:
            local_tensor(slot.param).view(-1).copy_(self._unchunk(gathered, slot))

    def _all_gather(self, send: torch.Tensor) -> torch.Tensor:
        """(dp, len(send)): every rank's `send`, in rank order."""
        gathered = send.new_empty(self.dp, send.numel())
        self.collectives.all_gather_into(gathered.view(-1), send, self.group)
        return gathered

    @staticmethod
    def _unchunk(gathered: torch.Tensor, slot: _Slot) -> torch.Tensor:
        """`slot`'s flattened local tensor from every rank's bucket segment (rows of `gathered`)."""
        return gathered[:, slot.offset : slot.offset + slot.chunk].reshape(-1)[: slot.numel]

    def zero_grad(self) -> None:
        """Free every gradient (the parameters', the owned chunks' and stage 2's reduced buckets)."""
        for slot in self.slots:
            slot.param.grad = None
            slot.owned.grad = None
        for bucket in self.buckets:
            bucket.grads = None

    @torch.no_grad()
    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Every parameter's whole averaged gradient (global shape, plain tensors), by name, for verification.

        Call after sync_gradients. A collective over the dp group (stage 2) and the tp group (DTensor parameters).
        """
        if self.stage < 2:
            local_grads = {slot.name: local_tensor(slot.param.grad) for slot in self.slots}
        else:
            local_grads = {}
            for bucket in self.buckets:
                if bucket.grads is None:
                    raise RuntimeError("full_gradients needs gradients: call sync_gradients first")
                gathered = self._all_gather(bucket.grads)
                for slot in bucket.slots:
                    local_grads[slot.name] = self._unchunk(gathered, slot).view_as(local_tensor(slot.param))
        full = {}
        for slot in self.slots:
            grad = local_grads[slot.name]
            if isinstance(slot.param, DTensor):
                spec = slot.param
                grad = DTensor.from_local(
                    grad, spec.device_mesh, spec.placements, shape=spec.shape, stride=spec.stride()
                ).full_tensor()
            full[slot.name] = grad.clone()
        return full

    def state_dict(self) -> dict[str, Any]:
        """This rank's AdamW state (its chunks only for stages 1 and 2)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` from the same rank of the same layout."""
        self.optimizer.load_state_dict(state)

    @torch.no_grad()
    def fqn_state_dict(self) -> dict[str, Any]:
        """AdamW's state in the layout-independent form of torch's
        `get_optimizer_state_dict(..., StateDictOptions(flatten_optimizer_state_dict=True))`:
        `state.<name>.{step, exp_avg, exp_avg_sq}` and `param_groups.<name>.<hyper-parameter>` per parameter name.

        exp_avg and exp_avg_sq have the parameter's shape: this rank's chunks are all-gathered over the dp group into
        the parameter's local tensor, a DTensor with the parameter's mesh and placements when the parameter is one.
        Before the first step the moments are zeros and step 0. A collective over the dp group (stages 1 and 2).
        """
        moments = {key: self._gathered_state(key) for key in ("exp_avg", "exp_avg_sq")}
        flat: dict[str, Any] = {}
        for slot in self.slots:
            step = self.optimizer.state.get(slot.owned, {}).get("step", torch.tensor(0.0))
            flat[f"state.{slot.name}.step"] = step.detach().clone()
            for key, by_name in moments.items():
                flat[f"state.{slot.name}.{key}"] = self._like_param(by_name[slot.name], slot.param)
        for group, names in zip(self.optimizer.param_groups, self._group_names(), strict=True):
            hyper = {k: v for k, v in group.items() if k != "params"}
            for name in names:
                flat.update({f"param_groups.{name}.{k}": v for k, v in hyper.items()})
        return flat

    @torch.no_grad()
    def load_fqn_state_dict(self, flat: dict[str, Any]) -> None:
        """Restore `fqn_state_dict()`'s form, saved in any layout: each rank keeps its chunk of the moments."""
        for slot in self.slots:
            moments = {}
            for key in ("exp_avg", "exp_avg_sq"):
                whole = local_tensor(flat[f"state.{slot.name}.{key}"]).reshape(-1)
                if whole.numel() != slot.numel:
                    raise ValueError(
                        f"optimizer state {key} of {slot.name} has {whole.numel()} local elements, the parameter "
                        f"{slot.numel}: lay the state out like the parameters (fqn_state_dict of this engine)"
                    )
                moments[key] = whole[slot.start : slot.start + slot.owned.numel()].clone()
            step = flat[f"state.{slot.name}.step"]
            self.optimizer.state[slot.owned] = {"step": torch.as_tensor(step).detach().clone().float(), **moments}
        for group, names in zip(self.optimizer.param_groups, self._group_names(), strict=True):
            for key in group.keys() - {"params"}:
                if names:  # hyper-parameters are per group: its first parameter's saved values stand for all
                    group[key] = flat[f"param_groups.{names[0]}.{key}"]

    def _group_names(self) -> list[list[str]]:
        """The parameter names of each of AdamW's groups, in order."""
        name_of = {id(slot.owned): slot.name for slot in self.slots}
        return [[name_of[id(owned)] for owned in group["params"]] for group in self.optimizer.param_groups]

    def _gathered_state(self, key: str) -> dict[str, torch.Tensor]:
        """AdamW's `key` state of every parameter, whole over the dp group, in the shape of its local tensor."""
        whole = {}
        for bucket in self.buckets:
            send = torch.zeros(bucket.size, dtype=self.slots[0].param.dtype, device=self.slots[0].param.device)
            for slot in bucket.slots:
                state = self.optimizer.state.get(slot.owned, {})
                if key in state:
                    send[slot.offset : slot.offset + slot.owned.numel()].copy_(state[key])
            gathered = send.view(1, -1) if self.stage == 0 else self._all_gather(send)
            for slot in bucket.slots:
                whole[slot.name] = self._unchunk(gathered, slot).view_as(local_tensor(slot.param)).clone()
        return whole

    @staticmethod
    def _like_param(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """`local` as `param` is laid out: a DTensor over the same mesh and placements, or the plain tensor."""
        if not isinstance(param, DTensor):
            return local
        return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())
