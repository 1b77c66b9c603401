"""model.cpu_fused_kernels (bigmodel/models/fused.py) against the plain modules with the same weights: the whole
model built both ways, and each fused module (QuickGeluMLP; SharedInputProjections for a self-attention's q, k, v
and a cross-attention's k, v; the CPU math-attention choice) beside its plain parent."""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch

from bigmodel.bench.activations import saved_activation_bytes
from bigmodel.config import ConfigError, load_config
from bigmodel.config.schema import LossWeights
from bigmodel.config.validate import check_fused_kernels
from bigmodel.losses import total_loss
from bigmodel.models import MultimodalEncoder, build_model
from bigmodel.models import fused as fused_module
from bigmodel.models.fused import FusedAttention, FusedBlock, FusedMLP
from bigmodel.models.layers import MLP, Attention, Block
from tests.unit.models.test_model import make_batch, tiny_config


def run(
    module: torch.nn.Module, x: torch.Tensor, bf16: bool = False, **kwargs: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and gradients (input's, each keyword tensor's, then each parameter's; None where not requested) of a
    squared-sum loss of `module(x, **kwargs)`."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    kwargs = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in kwargs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
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


def assert_fp32_close(got: torch.Tensor, want: torch.Tensor, scale: float | None = None) -> None:
    """Within 4e-6 of `scale` (default: the largest magnitude in `want`; ~32 fp32 ulp). The fused MLP computes
    silu(1.702 h) / 1.702 with the scales inside the matmuls, which rounds differently from h * sigmoid(1.702 h), and
    the fused projections sum the input's gradient in another order: measured <= 5.5e-7 of the largest value
    (outputs up to ~40, gradients up to ~2000 with these weights), and each path is as far from an fp64 run. A wrong
    scale or a missing term moves results by 1e-2 relative or more."""
    error, scale = (got - want).abs().max().item(), scale or want.abs().max().item()
    assert error <= 4e-6 * scale, (error, scale)


def assert_bf16_as_close_as_autocast(got: torch.Tensor, by_autocast: torch.Tensor, want: torch.Tensor) -> None:
    """bf16 rounds at 2^-9 relative per value; both paths land 2e-3 to 6e-3 (relative norm) from fp32 here. The
    fused path may be at most 1.5x further off than autocast through the plain modules, and never past 2e-2."""
    error, autocast_error = ((t.float() - want).norm() / want.norm() for t in (got, by_autocast))
    assert error <= 1.5 * autocast_error and error <= 2e-2, (error, autocast_error)


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten().float() for t in tensors])


# The whole model


def model_pair() -> tuple[MultimodalEncoder, MultimodalEncoder]:
    """The tiny cross-fusion quick_gelu model (self- and cross-attention blocks) built plain and with
    cpu_fused_kernels; the weights are equal because initialisation depends on the seed and each name only."""
    cfg = tiny_config("cross", activation="quick_gelu")
    return build_model(cfg, seed=0), build_model(dataclasses.replace(cfg, cpu_fused_kernels=True), seed=0)


def loss_and_grads(model: MultimodalEncoder, bf16: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Total loss of every objective on the tiny batch, and each parameter's gradient."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(make_batch(model.cfg))
    loss, _ = total_loss(out, LossWeights())
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def test_switch_builds_fused_blocks_with_the_plain_parameter_names() -> None:
    plain, fused_model = model_pair()
    weights, fused_weights = plain.state_dict(), fused_model.state_dict()
    assert fused_weights.keys() == weights.keys()
    assert all(torch.equal(fused_weights[name], tensor) for name, tensor in weights.items())
    blocks = [m for m in fused_model.modules() if isinstance(m, Block)]
    assert blocks and all(type(m) is FusedBlock for m in blocks)
    assert any(hasattr(m, "cross_attn") for m in blocks)
    assert not {type(m) for m in plain.modules()} & {FusedBlock, FusedAttention, FusedMLP}


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_fused_model_matches_the_plain_model(bf16: bool) -> None:
    plain, fused_model = model_pair()
    loss, grads = loss_and_grads(fused_model, bf16)
    want, want_grads = loss_and_grads(plain, bf16)
    assert all(g is not None for g in grads)
    if bf16:
        fp32_loss, fp32_grads = loss_and_grads(plain, bf16=False)
        assert_bf16_as_close_as_autocast(loss, want, fp32_loss)
        assert_bf16_as_close_as_autocast(flat(grads), flat(want_grads), flat(fp32_grads))
    else:
        assert_fp32_close(loss, want)
        # Against the largest gradient, as in the attention test (some are zero exactly): measured 3.1e-7 of it.
        scale = max(g.abs().max().item() for g in want_grads)
        for got, expected in zip(grads, want_grads, strict=True):
            assert_fp32_close(got, expected, scale)


# The MLP


def make_mlps(activation: str = "quick_gelu", seed: int = 0) -> tuple[MLP, FusedMLP, torch.Tensor]:
    """A small plain MLP with weights of the size a trained layer has (std 0.5, so the activation's curved part is
    used), a FusedMLP with the same weights, and an input of 3 x 10 tokens of width 32."""
    torch.manual_seed(seed)
    mlp = MLP(32, 128, activation)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 0.5)
    fused = FusedMLP(32, 128, activation)
    fused.load_state_dict(mlp.state_dict())
    return mlp, fused, torch.randn(3, 10, 32)


def fused(out: torch.Tensor) -> bool:
    return "QuickGeluMLPBackward" in backward_nodes(out)


def test_fused_mlp_matches_the_plain_mlp_in_fp32() -> None:
    mlp, fused_mlp, x = make_mlps()
    x.requires_grad_()
    out, grads = run(fused_mlp, x)
    want, want_grads = run(mlp, x)
    exact, exact_grads = run(copy.deepcopy(mlp).double(), x.double())
    assert fused(out) and not fused(want)
    for got, expected, fp64 in zip([out, *grads], [want, *want_grads], [exact, *exact_grads], strict=True):
        assert_fp32_close(got, expected)
        assert_fp32_close(got.double(), fp64)


def test_fused_mlp_in_bf16_is_as_close_to_fp32_as_autocast() -> None:
    mlp, fused_mlp, x = make_mlps()
    x.requires_grad_()
    out, grads = run(fused_mlp, x, bf16=True)
    plain, plain_grads = run(mlp, x, bf16=True)
    want, want_grads = run(mlp, x)
    assert fused(out) and out.dtype == plain.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in grads[1:])  # the parameters' own dtype, as autocast leaves them
    for got, by_autocast, expected in zip([out, *grads], [plain, *plain_grads], [want, *want_grads], strict=True):
        assert_bf16_as_close_as_autocast(got, by_autocast, expected)


@pytest.mark.parametrize("frozen", ["fc1", "fc2", "weights"])
def test_fused_mlp_computes_only_requested_gradients(frozen: str) -> None:
    mlp, fused_mlp, x = make_mlps()
    x.requires_grad_(frozen == "weights")  # a frozen backbone still passes gradients to what feeds it
    for module in (mlp, fused_mlp):
        for name, p in module.named_parameters():
            p.requires_grad_(frozen not in (name.split(".")[0], "weights"))
    out, grads = run(fused_mlp, x)
    _, want_grads = run(mlp, x)
    assert fused(out)
    for got, expected in zip(grads, want_grads, strict=True):
        assert (got is None) == (expected is None)
        if expected is not None:
            assert_fp32_close(got, expected)


def test_other_activations_run_the_plain_mlp() -> None:
    mlp, fused_mlp, x = make_mlps("gelu")
    x.requires_grad_()
    out, want = fused_mlp(x), mlp(x)
    assert not fused(out) and torch.equal(out, want)  # gelu is one kernel already


def test_second_derivatives_are_refused_not_wrong() -> None:
    _, fused_mlp, x = make_mlps()
    x.requires_grad_()
    (grad,) = torch.autograd.grad(fused_mlp(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


# Attention


def make_attentions(seed: int = 0) -> tuple[Attention, FusedAttention, torch.Tensor]:
    """Self-attention of width 32 with 4 heads (weights std 0.3), a FusedAttention with the same weights, and an
    input of 3 x 10 tokens."""
    torch.manual_seed(seed)
    attention = Attention(32, 4)
    with torch.no_grad():
        for p in attention.parameters():
            p.normal_(0, 0.3)
    fused_attention = FusedAttention(32, 4)
    fused_attention.load_state_dict(attention.state_dict())
    return attention, fused_attention, torch.randn(3, 10, 32)


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
def test_fused_projections_match_the_plain_attention_in_fp32(cross: bool) -> None:
    attention, fused_attention, x = make_attentions()
    x.requires_grad_()
    context = attention_inputs(cross)
    out, grads = run(fused_attention, x, **context)
    want, want_grads = run(attention, x, **context)
    exact, exact_grads = run(
        copy.deepcopy(attention).double(), x.double(), **{k: v.double() for k, v in context.items()}
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
def test_fused_projections_in_bf16_cast_once_and_are_as_close_to_fp32_as_autocast(
    cross: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    attention, fused_attention, x = make_attentions()
    x.requires_grad_()
    context = attention_inputs(cross)
    out, grads = run(fused_attention, x, bf16=True, **context)
    plain, plain_grads = run(attention, x, bf16=True, **context)
    want, want_grads = run(attention, x, **context)
    assert all(g.dtype == torch.float32 for g in grads)
    # All gradients together: k_proj's bias gradient is zero in exact arithmetic.
    assert_bf16_as_close_as_autocast(out, plain, want)
    assert_bf16_as_close_as_autocast(flat(grads), flat(plain_grads), flat(want_grads))

    def saved(module: torch.nn.Module) -> int:
        return saved_activation_bytes(OnInput(module), {"x": x, **context}, bf16=True)

    # Through the plain modules autocast keeps a bf16 copy of the shared input for each projection reading it: for a
    # self-attention two more (N, D) bf16 tensors (q, k and v read x), for a cross-attention one more of its fp32
    # context. (In the model the context is image_proj's output, bf16 already under autocast: nothing is cast.)
    # Both with torch's own SDPA backend here: the math one the fused attention asks for saves the attention matrix.
    monkeypatch.setattr(fused_module, "CPU_MATH_ATTENTION_MAX_TOKENS", 0)
    extra = context["context"].numel() * 2 if cross else 2 * x.numel() * 2
    assert saved(attention) - saved(fused_attention) == extra


@pytest.mark.parametrize("frozen", ["q_proj", "v_proj", "weights"])
def test_fused_projections_compute_only_requested_gradients(frozen: str) -> None:
    attention, fused_attention, x = make_attentions()
    x.requires_grad_(frozen == "weights")
    for module in (attention, fused_attention):
        for name, p in module.named_parameters():
            p.requires_grad_(frozen not in (name.split(".")[0], "weights"))
    out, grads = run(fused_attention, x)
    _, want_grads = run(attention, x)
    assert "SharedInputProjectionsBackward" in backward_nodes(out)
    scale = max(g.abs().max().item() for g in want_grads if g is not None)
    for got, expected in zip(grads, want_grads, strict=True):
        assert (got is None) == (expected is None)
        if expected is not None:
            assert_fp32_close(got, expected, scale)  # as in the fp32 test


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_bf16_math_attention_matches_fp32_like_the_default_backend(causal: bool) -> None:
    """The math backend FusedAttention asks for on short bf16 sequences on CPU is as close to an fp32 reference as
    SDPA's own choice (the plain Attention), outputs and input gradients alike."""
    attention, fused_attention = Attention(64, 2), FusedAttention(64, 2)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 2, 65, 32, generator=generator) for _ in range(3))
    mask = torch.ones(65, 65, dtype=torch.bool).tril()[None, None] if causal else None

    def attend(module: Attention, dtype: torch.dtype) -> list[torch.Tensor]:
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        out = module.attend(*leaves, mask)
        out.float().square().sum().backward()
        return [out.float(), *(t.grad.float() for t in leaves)]

    reference = attend(attention, torch.float32)
    by_default = attend(attention, torch.bfloat16)
    for got, default, want in zip(attend(fused_attention, torch.bfloat16), by_default, reference, strict=True):
        error, default_error = ((x - want).norm() / want.norm() for x in (got, default))
        # bf16 rounds at 2^-9 relative per value; both backends land 3e-3 to 7e-3 (relative norm) from fp32 here. The
        # math path may be at most 1.5x further off than the default, and never past 1e-2 (a wrong mask or scale is ~1).
        assert error <= 1.5 * default_error and error <= 1e-2, (error, default_error)


# Where the switch is refused


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["--parallel.tp=2", "--parallel.dp_shard=1"], "parallel.tp=2"),
        (["--train.compile=true"], "train.compile=True"),
    ],
)
def test_config_refuses_the_switch_where_modules_must_be_called(overrides: list[str], field: str) -> None:
    with pytest.raises(
        ConfigError, match="^" + re.escape(f"{field} is not supported with model.cpu_fused_kernels=true")
    ) as err:
        load_config("configs/tiny.yaml", ["--model.cpu_fused_kernels=true", *overrides])
    assert "set model.cpu_fused_kernels=false" in str(err.value)
    load_config("configs/tiny.yaml", overrides)  # the layout itself is fine without the switch


def test_config_refuses_the_switch_under_deepspeed_zero3_only() -> None:
    cfg = load_config("configs/tiny.yaml", ["--model.cpu_fused_kernels=true"])
    for stage in (0, 1, 2, 3):
        layout = dataclasses.replace(
            cfg, engine="deepspeed", parallel=dataclasses.replace(cfg.parallel, zero_stage=stage)
        )
        if stage < 3:
            check_fused_kernels(layout)  # ZeRO 1-2 keep whole parameters: the fused kernels read them as they are
            continue
        with pytest.raises(
            ConfigError, match=r"^parallel\.zero_stage=3 is not supported with model\.cpu_fused_kernels"
        ):
            check_fused_kernels(layout)
    check_fused_kernels(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, zero_stage=3)))  # FSDP2
