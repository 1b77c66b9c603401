"""ZeRO's model-state memory theory, and the per-rank measurement on single-process models (the distributed
measurements are checked against the theory in tests/distributed/parallel/test_zero.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bigmodel.parallel.memory import model_state_bytes, zero_theory_bytes


@pytest.mark.parametrize(
    ("stage", "expected_gb"),
    [(0, 120.0), (1, 31.40625), (2, 16.640625), (3, 1.875)],
)
def test_matches_the_zero_paper(stage, expected_gb):
    # Rajbhandari et al. 2020, Figure 1: 7.5B parameters on 64 GPUs, mixed-precision Adam (2 + 2 + 12 bytes per
    # parameter) needs 120, 31.4, 16.6 and 1.9 GB per GPU at stages 0-3.
    parts = zero_theory_bytes(7_500_000_000, dp=64, stage=stage, bytes_per_param=2, optimizer_states=6)
    assert sum(parts.values()) / 1e9 == pytest.approx(expected_gb, rel=1e-12)


def test_fp32_adam_shards_one_more_part_per_stage():
    psi, dp = 1000, 4
    full = {"params": 4 * psi, "grads": 4 * psi, "optimizer": 8 * psi}
    assert zero_theory_bytes(psi, dp, 0) == full
    assert zero_theory_bytes(psi, dp, 1) == {**full, "optimizer": 8 * psi / dp}
    assert zero_theory_bytes(psi, dp, 2) == {**full, "grads": 4 * psi / dp, "optimizer": 8 * psi / dp}
    assert zero_theory_bytes(psi, dp, 3) == {"params": 4 * psi / dp, "grads": 4 * psi / dp, "optimizer": 8 * psi / dp}
    # One rank: sharding changes nothing.
    assert all(zero_theory_bytes(psi, 1, stage) == full for stage in range(4))


@pytest.mark.parametrize(("psi", "dp", "stage"), [(10, 4, 4), (10, 0, 1), (-1, 2, 1)])
def test_rejects_impossible_arguments(psi, dp, stage):
    with pytest.raises(ValueError):
        zero_theory_bytes(psi, dp, stage)


def test_adamw_on_one_process_is_sixteen_bytes_per_parameter():
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), foreach=False)
    model(torch.randn(5, 8)).sum().backward()
    optimizer.step()
    psi = sum(p.numel() for p in model.parameters())
    tensors = len(list(model.parameters()))
    # AdamW keeps exp_avg and exp_avg_sq per parameter, plus a 4-byte fp32 step counter per tensor.
    assert model_state_bytes(model, optimizer) == {
        "params": 4 * psi,
        "grads": 4 * psi,
        "optimizer": 8 * psi + 4 * tensors,
    }


def test_views_count_their_storage_once():
    # The ZeRO layout: the optimizer updates views into the parameters, and their gradients are views into one
    # reduced buffer; neither may be counted again.
    model = nn.Linear(6, 4, bias=False)
    halves = [nn.Parameter(model.weight.detach().view(-1)[i * 12 : (i + 1) * 12]) for i in range(2)]
    buffer = torch.zeros(24)
    for i, half in enumerate(halves):
        half.grad = buffer[i * 12 : (i + 1) * 12]
    optimizer = torch.optim.AdamW(halves[:1], foreach=False)  # this rank owns the first half
    optimizer.step()
    assert model_state_bytes(model, optimizer) == {"params": 96, "grads": 96, "optimizer": 2 * 48 + 4}
