"""The autograd functions bigmodel.models.layers runs plain layers through, against autograd through the modules
with the same weights: QuickGeluMLP (quick_gelu blocks' MLP: fc2(h * sigmoid(1.702 h)) with h = fc1(x)) and
SharedInputProjections (q, k and v of a self-attention; k and v of a cross-attention)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import pytest
import torch

import bigmodel.models.layers as layers
from bigmodel.models.layers import MLP, Attention


def make_mlp(activation: str = "quick_gelu", seed: int = 0) -> tuple[MLP, torch.Tensor]:
    """A small MLP with weights of the size a trained layer has (std 0.5, so the activation's curved part is used)
    and an input of 3 x 10 tokens of width 32."""
    torch.manual_seed(seed)
    mlp = MLP(32, 128, activation)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 0.5)
    return mlp, torch.randn(3, 10, 32)


@contextlib.contextmanager
def through_modules(enabled: bool) -> Iterator[None]:
    """Within the block, if `enabled`, every layer runs its modules as written: plain_linears says no, as it does to
    tensor-parallel or hooked layers."""
    with pytest.MonkeyPatch.context() as patch:
        if enabled:
            patch.setattr(layers, "plain_linears", lambda *linears: False)
        yield


def run(
    module: torch.nn.Module, x: torch.Tensor, modules: bool, bf16: bool = False, **kwargs: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and gradients (input's, each keyword tensor's, then each parameter's; None where not requested) of a
    squared-sum loss of `module(x, **kwargs)`; `modules`: through the modules as plain autograd (for the MLP: fc1,
    quick_gelu, fc2), else through the fused functions where they apply."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    kwargs = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in kwargs.items()}
    with through_modules(modules), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = module(x, **kwargs)
    out.float().square().sum().backward()
    return out, [x.grad, *(v.grad for v in kwargs.values()), *(p.grad for p in module.parameters())]


def backward_nodes(out: torch.Tensor) -> set[str]:
    """The names of the autograd nodes `out` was computed through."""
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack += [next_node for next_node, _ in node.next_functions]
    return {type(node).__name__ for node in seen}


def fused(out: torch.Tensor) -> bool:
    return "QuickGeluMLPBackward" in backward_nodes(out)


def assert_fp32_close(got: torch.Tensor, want: torch.Tensor, scale: float | None = None) -> None:
    """Within 4e-6 of `scale` (default: the largest magnitude in `want`; ~32 fp32 ulp). The fused MLP computes
    silu(1.702 h) / 1.702 with the scales inside the matmuls, which rounds differently from h * sigmoid(1.702 h), and
    the fused projections sum the input's gradient in another order: measured <= 5.5e-7 of the largest value
    (outputs up to ~40, gradients up to ~2000 with these weights), and each path is as far from an fp64 run. A wrong
    scale or a missing term moves results by 1e-2 relative or more."""
    error, scale = (got - want).abs().max().item(), scale or want.abs().max().item()
    assert error <= 4e-6 * scale, (error, scale)


def test_fused_mlp_matches_autograd_in_fp32() -> None:
    mlp, x = make_mlp()
    x.requires_grad_()
    out, grads = run(mlp, x, modules=False)
    want, want_grads = run(mlp, x, modules=True)
    exact, exact_grads = run(copy.deepcopy(mlp).double(), x.double(), modules=True)
    assert fused(out) and not fused(want)
    for got, expected, fp64 in zip([out, *grads], [want, *want_grads], [exact, *exact_grads], strict=True):
        assert_fp32_close(got, expected)
        assert_fp32_close(got.double(), fp64)


def test_fused_mlp_in_bf16_is_as_close_to_fp32_as_autocast() -> None:
    mlp, x = make_mlp()
    x.requires_grad_()
    out, grads = run(mlp, x, modules=False, bf16=True)
    plain, plain_grads = run(mlp, x, modules=True, bf16=True)
    want, want_grads = run(mlp, x, modules=True)
    assert fused(out) and out.dtype == plain.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in grads[1:])  # the parameters' own dtype, as autocast leaves them
    for got, by_autocast, expected in zip([out, *grads], [plain, *plain_grads], [want, *want_grads], strict=True):
        error, autocast_error = ((t.float() - expected).norm() / expected.norm() for t in (got, by_autocast))
        # bf16 rounds at 2^-9 relative per value; both land 2e-3 to 6e-3 (relative norm) from fp32 here. The fused
        # path may be at most 1.5x further off than autocast through the modules, and never past 2e-2.
        assert error <= 1.5 * autocast_error and error <= 2e-2, (error, autocast_error)


@pytest.mark.parametrize("frozen", ["fc1", "fc2", "weights"])
def test_fused_mlp_computes_only_requested_gradients(frozen: str) -> None:
    mlp, x = make_mlp()
    x.requires_grad_(frozen == "weights")  # a frozen backbone still passes gradients to what feeds it
    for name, p in mlp.named_parameters():
        p.requires_grad_(frozen not in (name.split(".")[0], "weights"))
    out, grads = run(mlp, x, modules=False)
    _, want_grads = run(mlp, x, modules=True)
    assert fused(out)
    for got, expected in zip(grads, want_grads, strict=True):
        assert (got is None) == (expected is None)
        if expected is not None:
            assert_fp32_close(got, expected)


def test_hooked_compiled_or_other_activations_go_through_the_modules() -> None:
    mlp, x = make_mlp()
    calls = []
    handle = mlp.fc1.register_forward_hook(lambda *_: calls.append("fc1"))
    assert not fused(mlp(x.requires_grad_())) and calls == ["fc1"]  # tensor parallelism's hooks must run
    handle.remove()
    assert fused(mlp(x))
    # Backward hooks on a layer, and hooks for every module (a profiler's), run only if the modules are called.
    handle = mlp.fc2.register_full_backward_hook(lambda *_: calls.append("fc2 backward"))
    mlp(x).sum().backward()
    assert calls == ["fc1", "fc2 backward"]
    handle.remove()
    with torch.nn.modules.module.register_module_forward_hook(lambda module, *_: calls.append(type(module).__name__)):
        assert not fused(mlp(x))
    assert calls[2:] == ["Linear", "Linear", "MLP"]
    assert fused(mlp(x))
    # Compiled code takes the modules' path (inductor fuses it): dynamo's eager backend runs the traced ops as they
    # are, so the graph shows which path was traced.
    assert "SigmoidBackward0" in backward_nodes(torch.compile(mlp, backend="eager")(x))
    gelu, _ = make_mlp("gelu")
    assert not fused(gelu(x))


def test_second_derivatives_are_refused_not_wrong() -> None:
    mlp, x = make_mlp()
    x.requires_grad_()
    (grad,) = torch.autograd.grad(mlp(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def make_attention(seed: int = 0) -> tuple[Attention, torch.Tensor]:
    """Self-attention of width 32 with 4 heads (weights std 0.3) and an input of 3 x 10 tokens."""
    torch.manual_seed(seed)
    attention = Attention(32, 4)
    with torch.no_grad():
        for p in attention.parameters():
            p.normal_(0, 0.3)
    return attention, torch.randn(3, 10, 32)


class OnInput(torch.nn.Module):
    """`module` called on a batch's "x", as saved_activation_bytes calls a model on a batch. The input is made a
    computed tensor, as a norm's output is: autocast casts a leaf once and reuses the cast."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.module(batch["x"] * 1.0, **{k: v * 1.0 for k, v in batch.items() if k != "x"})


def attention_inputs(cross: bool) -> dict[str, torch.Tensor]:
    """A cross-attention's context (3 x 7 tokens, requiring its gradient), or nothing for a self-attention."""
    return (
        {"context": torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(1)).requires_grad_()} if cross else {}
    )


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_fused_projections_match_autograd_in_fp32(cross: bool) -> None:
    attention, x = make_attention()
    x.requires_grad_()
    context = attention_inputs(cross)
    out, grads = run(attention, x, modules=False, **context)
    want, want_grads = run(attention, x, modules=True, **context)
    exact, exact_grads = run(
        copy.deepcopy(attention).double(), x.double(), modules=True, **{k: v.double() for k, v in context.items()}
    )
    assert "SharedInputProjectionsBackward" in backward_nodes(out)
    assert "SharedInputProjectionsBackward" not in backward_nodes(want)
    # Gradients against the largest of them: k_proj's bias gets zero in exact arithmetic (softmax ignores a shift
    # shared by every key), so its own scale is rounding noise.
    scale = max(g.abs().max().item() for g in want_grads)
    assert_fp32_close(out, want)
    assert_fp32_close(out.double(), exact)
    for got, expected, fp64 in zip(grads, want_grads, exact_grads, strict=True):
        assert_fp32_close(got, expected, scale)  # the input's gradient is summed in another order: a few ulp
        assert_fp32_close(got.double(), fp64, scale)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_fused_projections_in_bf16_cast_once_and_are_as_close_to_fp32_as_autocast(cross: bool) -> None:
    from bigmodel.bench.activations import saved_activation_bytes

    attention, x = make_attention()
    x.requires_grad_()
    context = attention_inputs(cross)
    out, grads = run(attention, x, modules=False, bf16=True, **context)
    plain, plain_grads = run(attention, x, modules=True, bf16=True, **context)
    want, want_grads = run(attention, x, modules=True, **context)
    assert all(g.dtype == torch.float32 for g in grads)
    flat = [torch.cat([g.flatten() for g in gs]) for gs in (grads, plain_grads, want_grads)]
    for got, by_autocast, expected in ((out, plain, want), tuple(flat)):
        error, autocast_error = ((t.float() - expected).norm() / expected.norm() for t in (got, by_autocast))
        # As for the MLP: bf16 lands 2e-3 to 6e-3 from fp32 (all gradients together: k_proj's bias gradient is zero in
        # exact arithmetic); at most 1.5x autocast's error through the modules.
        assert error <= 1.5 * autocast_error and error <= 2e-2, (error, autocast_error)

    def saved(modules: bool) -> int:
        with through_modules(modules):
            return saved_activation_bytes(OnInput(attention), {"x": x, **context}, bf16=True)

    # Through the modules autocast keeps a bf16 copy of the shared input for each projection reading it: for a
    # self-attention two more (N, D) bf16 tensors (q, k and v read x), for a cross-attention one more of its fp32
    # context. (In the model the context is image_proj's output, bf16 already under autocast: nothing is cast.)
    extra = context["context"].numel() * 2 if cross else 2 * x.numel() * 2
    assert saved(modules=True) - saved(modules=False) == extra


@pytest.mark.parametrize("frozen", ["q_proj", "v_proj", "weights"])
def test_fused_projections_compute_only_requested_gradients(frozen: str) -> None:
    attention, x = make_attention()
    x.requires_grad_(frozen == "weights")
    for name, p in attention.named_parameters():
        p.requires_grad_(frozen not in (name.split(".")[0], "weights"))
    out, grads = run(attention, x, modules=False)
    _, want_grads = run(attention, x, modules=True)
    assert "SharedInputProjectionsBackward" in backward_nodes(out)
    scale = max(g.abs().max().item() for g in want_grads if g is not None)
    for got, expected in zip(grads, want_grads, strict=True):
        assert (got is None) == (expected is None)
        if expected is not None:
            assert_fp32_close(got, expected, scale)  # as in the fp32 test


def test_hooked_projections_go_through_the_modules() -> None:
    attention, x = make_attention()
    calls = []
    attention.k_proj.register_forward_hook(lambda *_: calls.append("k_proj"))
    for context in ({}, attention_inputs(cross=True)):
        assert "SharedInputProjectionsBackward" not in backward_nodes(attention(x.requires_grad_(), **context))
    assert calls == ["k_proj", "k_proj"]
