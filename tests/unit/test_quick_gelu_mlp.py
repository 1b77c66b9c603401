"""QuickGeluMLP (bigmodel.models.layers), the fused MLP that quick_gelu blocks run, against autograd through the
plain modules: fc2(x * sigmoid(1.702 x)) with x = fc1(input), same weights."""

from __future__ import annotations

import copy

import pytest
import torch

from bigmodel.models.layers import MLP, quick_gelu


def make_mlp(activation: str = "quick_gelu", seed: int = 0) -> tuple[MLP, torch.Tensor]:
    """A small MLP with weights of the size a trained layer has (std 0.5, so the activation's curved part is used)
    and an input of 3 x 10 tokens of width 32."""
    torch.manual_seed(seed)
    mlp = MLP(32, 128, activation)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 0.5)
    return mlp, torch.randn(3, 10, 32)


def run(mlp: MLP, x: torch.Tensor, modules: bool, bf16: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and gradients (input's, then each parameter's; None where not requested) of a squared-sum loss;
    `modules`: through fc1, quick_gelu and fc2 as plain autograd, else through MLP.forward."""
    mlp.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = mlp.fc2(quick_gelu(mlp.fc1(x))) if modules else mlp(x)
    out.float().square().sum().backward()
    return out, [x.grad, *(p.grad for p in mlp.parameters())]


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


def assert_fp32_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Within 4e-6 of the largest magnitude in `want` (~32 fp32 ulp). The fused path computes silu(1.702 h) / 1.702
    with the scales inside the matmuls, which rounds differently from h * sigmoid(1.702 h): measured <= 5.5e-7 of
    the largest value (outputs up to ~40, gradients up to ~2000 with these weights), and each path is as far from
    an fp64 run. A wrong scale or a missing term moves results by 1e-2 relative or more."""
    error, scale = (got - want).abs().max().item(), want.abs().max().item()
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
