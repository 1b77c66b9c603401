"""Transformer building blocks shared by every tower: attention, MLP and the pre-LN block.

Plain single-device PyTorch. Reshapes infer the head count from the tensor (`view(b, t, -1, head_dim)`), so a
tensor-parallel shard that holds only some of the heads runs the same code.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules import module as _module
from torch.utils.checkpoint import checkpoint

# On CPU in bf16/fp16, torch 2.13's flash-attention kernel (what SDPA picks) is 2-4x slower than the math path for
# short sequences: forward + backward of 32 x 8 heads x 65 tokens x 64 took 210-620 ms against 90-140 ms, a quarter
# of a training step of the CLIP benchmark (docs/benchmarks.md, (b)). From a few hundred tokens on flash wins.
CPU_MATH_ATTENTION_MAX_TOKENS = 128


QUICK_GELU_SCALE = 1.702


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation, x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(QUICK_GELU_SCALE * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`F.scaled_dot_product_attention` (q (B, nh, T, hd), k and v (B, nh, S, hd)), with the math backend where it
    is the faster one: on CPU, in half precision, with at most CPU_MATH_ATTENTION_MAX_TOKENS keys."""
    cpu_half = q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
    use_math = cpu_half and k.shape[-2] <= CPU_MATH_ATTENTION_MAX_TOKENS
    with sdpa_kernel(SDPBackend.MATH) if use_math else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def plain_linears(*linears: nn.Linear) -> bool:
    """Whether these linear layers may be run by an autograd function of this module without calling them: plain
    tensor weights (not the DTensors tensor parallelism makes them), no hooks that calling them would run (tensor
    parallelism's input and output redistribution, DeepSpeed ZeRO-3's parameter gathering, a profiler's or a user's;
    forward or backward, on these layers or on every module), and not inside compiled code (inductor fuses the
    modules' elementwise work itself)."""
    plain = all(type(p) in (torch.Tensor, nn.Parameter) for m in linears for p in (m.weight, m.bias))
    hooked = any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in linears
    )
    return plain and not hooked and not _global_module_hooks() and not torch.compiler.is_compiling()


def _global_module_hooks() -> bool:
    """Whether any hook registered for every module (`nn.modules.module.register_module_forward_hook` and the like)
    is in place."""
    return bool(
        _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
    )


def _parameters(*linears: nn.Linear) -> list[torch.Tensor]:
    """Each layer's weight, then its bias, in order: the arguments SharedInputProjections takes after its input."""
    return [p for m in linears for p in (m.weight, m.bias)]


def _autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`tensors` in the autocast dtype where autocast is on for their device (as a linear layer would take them),
    else as they are."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


class SharedInputProjections(torch.autograd.Function):
    """Several linear layers of one input x (..., D): q_proj(x), k_proj(x), v_proj(x) of a self-attention, or k_proj
    and v_proj of a cross-attention's context. Arguments: x, then each layer's weight and bias.

    Under autocast, x is cast once: through the modules autocast casts it for each layer and keeps each copy for
    backward. The gradient of x is one sum accumulated in the matmuls (addmm_), not a matmul per layer and the adds.
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


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None, else cross-attention to `context`."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.head_dim = width // heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, T, D); context: (B, S, D) or None; mask: bool (B, 1, T, S), True where attending is allowed."""
        source = x if context is None else context
        b, t, _ = x.shape
        s = source.shape[1]
        if not plain_linears(self.q_proj, self.k_proj, self.v_proj):
            q, k, v = self.q_proj(x), self.k_proj(source), self.v_proj(source)
        elif context is None:
            q, k, v = SharedInputProjections.apply(x, *_parameters(self.q_proj, self.k_proj, self.v_proj))
        else:
            q = self.q_proj(x)
            k, v = SharedInputProjections.apply(context, *_parameters(self.k_proj, self.v_proj))
        q = q.view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(b, s, -1, self.head_dim).transpose(1, 2)  # (B, nh, S, hd)
        v = v.view(b, s, -1, self.head_dim).transpose(1, 2)  # (B, nh, S, hd)
        y = attention(q, k, v, mask)  # (B, nh, T, hd)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, -1))  # (B, T, D)


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * (a @ b), the scale applied inside the matmul (BLAS alpha) rather than as a pass of its own. In place
    into a new tensor: with beta 0 its contents are never read, and nothing is copied into it first."""
    return a.new_empty(a.shape[0], b.shape[1]).addmm_(a, b, beta=0, alpha=scale)


class QuickGeluMLP(torch.autograd.Function):
    """fc2(quick_gelu(fc1(x))) for x (..., D), fc1 (F, D), fc2 (D, F), with quick_gelu(h) = silu(1.702 h) / 1.702.

    Both scales go into the matmuls (1.702 into fc1's alpha and beta, 1 / 1.702 into fc2's alpha), so the (..., F)
    hidden sees one elementwise kernel forward (silu) and one backward (silu_backward). Autograd through
    x * sigmoid(1.702 x) runs three forward and five backward, each over the largest activation of the block:
    ~10% of an fp32 training step of the CLIP benchmark (docs/benchmarks.md, (b)). Saves the hidden twice (before
    and after silu) where autograd saves it three times. Under autocast it computes in the autocast dtype, as the
    linear layers would.
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


class MLP(nn.Module):
    """Two linear layers around an activation."""

    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is quick_gelu and plain_linears(self.fc1, self.fc2):
            return QuickGeluMLP.apply(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN Transformer block: self-attention, optional cross-attention, MLP, each in a residual branch.

    Parameter names follow transformers' CLIPEncoderLayer (layer_norm1, self_attn, layer_norm2, mlp.fc1/fc2), so
    a CLIP checkpoint maps onto these blocks one to one.
    """

    def __init__(
        self, width: int, heads: int, mlp_dim: int, activation: str, dropout: float, eps: float, cross: bool = False
    ):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = Attention(width, heads)
        if cross:
            self.cross_norm = nn.LayerNorm(width, eps=eps)
            self.cross_attn = Attention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_dim, activation)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, T, D); context: (B, S, D) attended by the cross-attention (cross blocks only)."""
        x = x + self.dropout(self.self_attn(self.layer_norm1(x), mask=mask))
        if context is not None:
            x = x + self.dropout(self.cross_attn(self.cross_norm(x), context=context, mask=context_mask))
        return x + self.dropout(self.mlp(self.layer_norm2(x)))


class BlockStack(nn.Module):
    """Blocks in a ModuleDict keyed by layer index, so names survive a pipeline split that keeps only some."""

    def __init__(self, blocks: list[Block]):
        super().__init__()
        self.layers = nn.ModuleDict({str(i): block for i, block in enumerate(blocks)})
        self.activation_checkpointing = False

    def forward(self, x: torch.Tensor, **kwargs: torch.Tensor | None) -> torch.Tensor:
        for block in self.layers.values():
            if self.activation_checkpointing and torch.is_grad_enabled():
                # Non-reentrant checkpointing recomputes the block in backward and works with keyword inputs.
                x = checkpoint(block, x, use_reentrant=False, **kwargs)
            else:
                x = block(x, **kwargs)
        return x


def block_stack(
    width: int, heads: int, mlp_dim: int, layers: int, activation: str, dropout: float, eps: float, cross: bool = False
) -> BlockStack:
    """`layers` identical blocks in a BlockStack."""
    return BlockStack([Block(width, heads, mlp_dim, activation, dropout, eps, cross) for _ in range(layers)])
