"""Transformer building blocks shared by every tower: attention, MLP and the pre-LN block.

Plain single-device PyTorch. Reshapes infer the head count from the tensor (`view(b, t, -1, head_dim)`), so a
tensor-parallel shard that holds only some of the heads runs the same code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

QUICK_GELU_SCALE = 1.702


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation, x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(QUICK_GELU_SCALE * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


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
        q, k, v = self.project(x, source)
        q = q.view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(b, s, -1, self.head_dim).transpose(1, 2)  # (B, nh, S, hd)
        v = v.view(b, s, -1, self.head_dim).transpose(1, 2)  # (B, nh, S, hd)
        y = self.attend(q, k, v, mask)  # (B, nh, T, hd)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, -1))  # (B, T, D)

    def project(self, x: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, T, D) from x; k and v (B, S, D) from source (x itself in a self-attention)."""
        return self.q_proj(x), self.k_proj(source), self.v_proj(source)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """SDPA with torch's own backend choice: q (B, nh, T, hd), k and v (B, nh, S, hd) -> (B, nh, T, hd)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class MLP(nn.Module):
    """Two linear layers around an activation."""

    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN Transformer block: self-attention, optional cross-attention, MLP, each in a residual branch.

    Parameter names follow transformers' CLIPEncoderLayer (layer_norm1, self_attn, layer_norm2, mlp.fc1/fc2), so
    a CLIP checkpoint maps onto these blocks one to one. A subclass may swap in other attention and MLP modules
    with the same parameters (`bigmodel.models.fused.FusedBlock`).
    """

    attention_class: type[Attention] = Attention
    mlp_class: type[MLP] = MLP

    def __init__(
        self, width: int, heads: int, mlp_dim: int, activation: str, dropout: float, eps: float, cross: bool = False
    ):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = self.attention_class(width, heads)
        if cross:
            self.cross_norm = nn.LayerNorm(width, eps=eps)
            self.cross_attn = self.attention_class(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = self.mlp_class(width, mlp_dim, activation)
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
    width: int,
    heads: int,
    mlp_dim: int,
    layers: int,
    activation: str,
    dropout: float,
    eps: float,
    cross: bool = False,
    block: type[Block] = Block,
) -> BlockStack:
    """`layers` identical blocks of class `block` in a BlockStack."""
    return BlockStack([block(width, heads, mlp_dim, activation, dropout, eps, cross) for _ in range(layers)])
