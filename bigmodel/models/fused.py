"""Hand-fused CPU kernels for the Transformer blocks, opt-in through `model.cpu_fused_kernels`.

`FusedBlock` is a `Block` whose attention and MLP run their linear layers' weights through the autograd functions
below instead of calling the `nn.Linear` modules: same parameters and names (checkpoints, tensor-parallel plans and
transformers export are unaffected), same results up to rounding, less elementwise work and fewer saved copies on
a CPU (docs/benchmarks.md). Because the inner linears are never called, nothing that works through them sees them:
hooks on `q_proj`/`k_proj`/`v_proj`/`fc1`/`fc2` (a profiler's, a user's) do not fire, and tensor parallelism,
DeepSpeed ZeRO-3 (which gathers parameters in such hooks) and `train.compile` (inductor fuses the plain modules
itself) are refused by config validation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend, sdpa_kernel

from bigmodel.models.layers import MLP, QUICK_GELU_SCALE, Attention, Block, quick_gelu

# On CPU in bf16/fp16, SDPA's default (flash) kernel is several times slower than its math path for short sequences;
# from a few hundred keys on flash wins (docs/benchmarks.md).
CPU_MATH_ATTENTION_MAX_TOKENS = 128


def _autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`tensors` in the autocast dtype where autocast is on for their device (as a linear layer would take them),
    else as they are."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


def _parameters(*linears: nn.Linear) -> list[torch.Tensor]:
    """Each layer's weight, then its bias, in order: the arguments SharedInputProjections takes after its input."""
    return [p for m in linears for p in (m.weight, m.bias)]


class SharedInputProjections(torch.autograd.Function):
    """Several linear layers of one input x (..., D): q_proj(x), k_proj(x), v_proj(x) of a self-attention, or k_proj
    and v_proj of a cross-attention's context. Arguments: x, then each layer's weight and bias.

    Under autocast, x is cast once (through the modules autocast casts it for each layer and keeps each copy for
    backward), and the gradient of x is one sum accumulated in the matmuls (addmm_).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, *weights_and_biases: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, *params = _autocast(x, *weights_and_biases)
        rows = x.reshape(-1, x.shape[-1])  # (N, D)
        weights, biases = params[0::2], params[1::2]
        ctx.save_for_backward(rows, *weights)
        ctx.input_shape = x.shape
        return tuple(torch.addmm(b, rows, w.t()).view(*x.shape[:-1], -1) for w, b in zip(weights, biases, strict=True))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, *weights = ctx.saved_tensors
        need_x, *need = ctx.needs_input_grad
        grads = [g.reshape(-1, g.shape[-1]).to(rows.dtype) for g in grads]  # (N, D) each
        dx = None
        if need_x:
            dx = grads[0].mm(weights[0])
            for g, w in zip(grads[1:], weights[1:], strict=True):
                dx.addmm_(g, w)
            dx = dx.view(ctx.input_shape)
        out: list[torch.Tensor | None] = [dx]
        for i, g in enumerate(grads):
            out += [g.t().mm(rows) if need[2 * i] else None, g.sum(0) if need[2 * i + 1] else None]
        return tuple(out)


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * (a @ b), the scale applied inside the matmul (BLAS alpha; beta 0, so the new tensor is never read)."""
    return a.new_empty(a.shape[0], b.shape[1]).addmm_(a, b, beta=0, alpha=scale)


class QuickGeluMLP(torch.autograd.Function):
    """fc2(quick_gelu(fc1(x))) for x (..., D), fc1 (F, D), fc2 (D, F), with quick_gelu(h) = silu(1.702 h) / 1.702.

    Both scales go into the matmuls (1.702 into fc1's alpha and beta, 1 / 1.702 into fc2's alpha), so the (..., F)
    hidden sees one elementwise kernel forward (silu) and one backward, where autograd through x * sigmoid(1.702 x)
    runs three and five, and is saved twice instead of three times. Under autocast it computes in the autocast
    dtype, as the linear layers would.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
    ) -> torch.Tensor:
        x, w1, b1, w2, b2 = _autocast(x, w1, b1, w2, b2)
        rows = x.reshape(-1, x.shape[-1])  # (N, D)
        z = torch.addmm(b1, rows, w1.t(), beta=QUICK_GELU_SCALE, alpha=QUICK_GELU_SCALE)  # 1.702 fc1(x), (N, F)
        a = F.silu(z)
        y = torch.addmm(b2, a, w2.t(), alpha=1 / QUICK_GELU_SCALE)  # (N, D)
        ctx.save_for_backward(rows, w1, w2, z, a)
        ctx.input_shape = x.shape
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    @once_differentiable  # its backward is not itself differentiable: a second derivative raises, not a wrong value
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, w1, w2, z, a = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        dy = dy.reshape(-1, dy.shape[-1]).to(a.dtype)  # (N, D)
        dw2 = _scaled_mm(dy.t(), a, 1 / QUICK_GELU_SCALE) if need_w2 else None
        db2 = dy.sum(0) if need_b2 else None
        if not (need_x or need_w1 or need_b1):
            return None, None, None, dw2, db2
        dz = torch.ops.aten.silu_backward(_scaled_mm(dy, w2, 1 / QUICK_GELU_SCALE), z)  # (N, F)
        dx = _scaled_mm(dz, w1, QUICK_GELU_SCALE).view(ctx.input_shape) if need_x else None
        dw1 = _scaled_mm(dz.t(), rows, QUICK_GELU_SCALE) if need_w1 else None
        db1 = dz.sum(0).mul_(QUICK_GELU_SCALE) if need_b1 else None
        return dx, dw1, db1, dw2, db2


class FusedAttention(Attention):
    """Attention whose projections of a shared input run as one SharedInputProjections, and whose SDPA takes the
    math backend for short half-precision sequences on CPU."""

    def project(self, x: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if source is x:
            return SharedInputProjections.apply(x, *_parameters(self.q_proj, self.k_proj, self.v_proj))
        k, v = SharedInputProjections.apply(source, *_parameters(self.k_proj, self.v_proj))
        return self.q_proj(x), k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        cpu_half = q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
        if not (cpu_half and k.shape[-2] <= CPU_MATH_ATTENTION_MAX_TOKENS):
            return super().attend(q, k, v, mask)
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class FusedMLP(MLP):
    """An MLP that runs as one QuickGeluMLP when its activation is quick_gelu (the others are one kernel already)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not quick_gelu:
            return super().forward(x)
        return QuickGeluMLP.apply(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)


class FusedBlock(Block):
    """A Block built from FusedAttention and FusedMLP: what `model.cpu_fused_kernels: true` builds."""

    attention_class = FusedAttention
    mlp_class = FusedMLP
