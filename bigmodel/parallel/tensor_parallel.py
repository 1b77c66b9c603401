"""Tensor and sequence parallelism for the MultimodalEncoder: DTensor plans applied from outside the model.

Megatron-style tensor parallelism on a 1-D `tp` mesh. In every Transformer block of the vision tower, the text
tower and the fusion stack, q/k/v are split by output features (whole heads per rank) and the attention output
projection by input features; the MLP's fc1 likewise by output and fc2 by input features. The text token
embedding is split by vocabulary rows and the MLM and captioning decoders by vocabulary columns, their logits left
vocab-sharded for a vocab-parallel cross-entropy (`loss_context`). Everything else (patch embedding, positions,
tower norms, image projection, contrastive and ITM heads) is small and stays a plain replicated tensor: every
tensor-parallel rank sees the same samples and computes the same values and gradients for it.

With sequence parallelism, the residual stream inside each BlockStack is a DTensor sharded on the sequence dim
(dim 1): the block norms run on sequence shards, attention and MLP all-gather their input and reduce-scatter
their output. A BlockStack takes and returns plain replicated tensors, so the code around the stacks (class
token, pooling, masked-position selection, heads) is untouched. Attention masks and the cross-attention context
are passed through as plain replicated tensors. Sequence lengths need not divide the tp size (the vision tower
has 1 + patches tokens): the stream stays a DTensor from the stack's entry to its exit, so DTensor knows the
global length and splits unevenly (torch.chunk sizes), padding internally for the collectives.

Dropout (model.dropout > 0) runs in both modes but draws masks from each rank's own generator: the tensor-parallel
ranks must be seeded alike, or their replicated activations drift apart; the masks differ from one process's (with
sequence parallelism each rank draws its shard's), so equivalence with the reference holds for dropout 0 only.

Apply on the meta device, before `bigmodel.parallel.init.materialize_model` and before FSDP.
"""

from __future__ import annotations

import contextlib

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle

from bigmodel.models.encoder import CaptionHead, MaskedLMHead, MultimodalEncoder, TextTower
from bigmodel.models.layers import Block, BlockStack

SEQUENCE_DIM = 1
"""Tokens are (B, T, D) everywhere in the model."""


def apply_tensor_parallel(model: MultimodalEncoder, tp_mesh: DeviceMesh, sequence_parallel: bool = False) -> None:
    """Shard `model` in place over the 1-D `tp_mesh`; with `sequence_parallel`, also shard the block activations.

    Every rank of `tp_mesh` must call this with the same model and then feed the same batch. The layout must
    have passed `ParallelDims.validate` (tp divides the head counts, MLP widths and vocabulary). Call it on a
    model built on the meta device, then materialise it with `bigmodel.parallel.init.materialize_model`. Run
    forward, loss and backward inside `loss_context(True)`.
    """
    for stack in model.block_stacks():
        apply_block_stack(stack, tp_mesh, sequence_parallel)
    if hasattr(model.text, "token_embedding"):  # a pipeline stage other than the first has none
        apply_vocab_parallel_embedding(model.text, tp_mesh)
    for head in ("mlm_head", "caption_head"):  # a pipeline stage other than the last has neither
        if hasattr(model, head):
            apply_vocab_parallel_decoder(getattr(model, head), tp_mesh)


def apply_block_stack(stack: BlockStack, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard every block of `stack`; with sequence parallelism, shard the residual stream between the stack's
    entry and exit on the sequence dim."""
    for block in stack.layers.values():
        parallelize_module(block, tp_mesh, block_plan(block, sequence_parallel))
    if sequence_parallel:
        parallelize_module(stack, tp_mesh, sequence_parallel_boundary())


def block_plan(block: Block, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """The plan of one Transformer block, keyed by submodule name.

    Attention and MLP each take a replicated input and produce partial sums that one collective completes: an
    all-reduce (output replicated), or with sequence parallelism a reduce-scatter onto sequence shards.
    """
    attentions = ("self_attn", "cross_attn") if hasattr(block, "cross_attn") else ("self_attn",)

    def rowwise() -> RowwiseParallel:
        # With sequence parallelism the output stays a DTensor, so that the residual add and the next norm know
        # the global (possibly uneven) sequence length.
        if sequence_parallel:
            return RowwiseParallel(output_layouts=Shard(SEQUENCE_DIM), use_local_output=False)
        return RowwiseParallel()

    plan: dict[str, ParallelStyle] = {}
    for attn in attentions:
        # Whole heads per rank: the model's view(b, t, -1, head_dim) sees heads / tp local heads.
        plan |= {
            f"{attn}.q_proj": ColwiseParallel(),
            f"{attn}.k_proj": ColwiseParallel(),
            f"{attn}.v_proj": ColwiseParallel(),
            f"{attn}.out_proj": rowwise(),
        }
    plan |= {"mlp.fc1": ColwiseParallel(), "mlp.fc2": rowwise()}
    if sequence_parallel:
        norms = ["layer_norm1", "layer_norm2"] + (["cross_norm"] if "cross_attn" in attentions else [])
        plan |= {norm: SequenceParallel(sequence_dim=SEQUENCE_DIM) for norm in norms}
        # All-gather the normed sequence shards into the replicated input the column-parallel layers expect. Only
        # the first positional input (x) is touched: the mask and the cross-attention context pass as they came.
        plan |= {module: gather_sequence() for module in (*attentions, "mlp")}
    return plan


def gather_sequence() -> ParallelStyle:
    """A module's first input from sequence shards (a DTensor) to the whole sequence as a plain tensor."""
    return PrepareModuleInput(
        input_layouts=(Shard(SEQUENCE_DIM),), desired_input_layouts=(Replicate(),), use_local_output=True
    )


def sequence_parallel_boundary() -> ParallelStyle:
    """A BlockStack's entry and exit under sequence parallelism: the replicated (B, T, D) input becomes a DTensor
    sharded on T (a local slice, no communication); the sharded output is all-gathered back to a plain tensor."""
    return PrepareModuleInputOutput(
        input_layouts=(Replicate(),),
        desired_input_layouts=(Shard(SEQUENCE_DIM),),
        use_local_input=False,
        output_layouts=(Shard(SEQUENCE_DIM),),
        desired_output_layouts=(Replicate(),),
        use_local_output=True,
    )


def apply_vocab_parallel_embedding(text: TextTower, tp_mesh: DeviceMesh) -> None:
    """Split the token embedding by vocabulary rows; each rank looks up the ids it holds and an all-reduce
    assembles the replicated (B, L, D) embeddings. Needs vocab_size divisible by tp. DTensor's embedding backward
    returns the weight gradient replicated (the whole table on every rank); optimizer updates of the sharded
    weight take this rank's rows of it."""
    parallelize_module(text, tp_mesh, {"token_embedding": RowwiseParallel(input_layouts=Replicate())})


def apply_vocab_parallel_decoder(head: MaskedLMHead | CaptionHead, tp_mesh: DeviceMesh) -> None:
    """Split an MLM or captioning decoder by vocabulary columns. Its logits stay a DTensor sharded on the
    vocabulary (M, V/tp per rank), never gathered: the cross-entropy must run under `loss_context(True)`. Code that
    reads the logits themselves (evaluation accuracy) needs `.full_tensor()`."""
    parallelize_module(head, tp_mesh, {"decoder": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)})


def loss_context(tp_enabled: bool) -> contextlib.AbstractContextManager:
    """The context the forward, the loss and the backward run in: `loss_parallel()` with tensor parallelism, so
    that `F.cross_entropy` on vocab-sharded MLM and captioning logits is computed without gathering them; else a
    no-op.

    The backward must run inside it too. `bigmodel.losses.masked_lm_loss` returns the vocab-parallel loss as a
    plain tensor, so `total_loss` and its parts stay plain; the contrastive and ITM losses are unaffected.
    """
    return loss_parallel() if tp_enabled else contextlib.nullcontext()


def align_gradients(model: nn.Module) -> None:
    """Give every DTensor gradient its parameter's placements, so code that works on local tensors (ZeRO 0-2,
    the gradient norm) sees this rank's shard of the whole, reduced gradient.

    After backward, a sequence-parallel norm's gradient can still be Partial (unreduced over the tp ranks) and the
    vocab-parallel embedding's gradient Replicate (the whole table) while its weight is sharded. Redistributing
    reduces the first (all-reduce) and slices the second (no communication). Call after the last backward of a step.
    """
    for param in model.parameters():
        grad = param.grad
        if isinstance(grad, DTensor) and grad.placements != param.placements:
            param.grad = grad.redistribute(param.device_mesh, param.placements)
