"""The single-process sigmoid loss against its formula written out, and against OpenCLIP's SigLipLoss."""

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

from bigmodel.config.schema import ModelConfig
from bigmodel.losses import siglip_loss


def inputs(b: int = 8, e: int = 16, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(b, e, generator=gen, dtype=dtype), dim=-1)
    # Texts near their images, so that positives and negatives both contribute to the loss and its gradient.
    texts = F.normalize(images + torch.randn(b, e, generator=gen, dtype=dtype), dim=-1)
    return images, texts, torch.tensor(5.0, dtype=dtype), torch.tensor(-2.0, dtype=dtype)


def test_siglip_loss_equals_the_formula_written_out():
    images, texts, scale, bias = inputs()
    b = images.shape[0]
    # In float64 from the definition: -sum_ij log sigmoid(y_ij * z_ij) / b, log sigmoid(t) = -log(1 + exp(-t)).
    z = scale.item() * images.double() @ texts.double().t() + bias.item()
    y = 2 * torch.eye(b, dtype=torch.float64) - 1
    expected = torch.log1p(torch.exp(-y * z)).sum() / b
    loss = siglip_loss(images, texts, scale, bias)
    # fp32 against fp64: 64 terms of size ~1 rounded at 6e-8 each, a few 1e-7 relative at worst.
    assert abs(loss.item() - expected.item()) <= 1e-6 * expected.item()


def test_siglip_loss_equals_open_clip_in_value_and_gradient():
    images, texts, scale, bias = inputs()
    ours = [t.clone().requires_grad_() for t in (images, texts, scale, bias)]
    theirs = [t.clone().requires_grad_() for t in (images, texts, scale, bias)]
    loss = siglip_loss(*ours)
    loss.backward()
    reference = SigLipLoss(rank=0, world_size=1)(*theirs)
    reference.backward()
    # Same fp32 operations, in a different order (bias added in place there, labels built differently): 1e-6
    # relative is ~10 ulps, and a changed normalisation or a wrong label would be off by >= 10%.
    assert abs(loss.item() - reference.item()) <= 1e-6 * reference.item()
    for mine, ref in zip(ours, theirs, strict=True):
        assert (mine.grad - ref.grad).abs().max() <= 1e-6 * ref.grad.abs().max()
        assert ref.grad.abs().max() > 1e-3, "the gradient must be non-trivial for the comparison to mean anything"


def test_per_row_scale_and_bias_equal_the_scalar_ones():
    images, texts, scale, bias = inputs()
    b = images.shape[0]
    per_row = siglip_loss(images, texts, scale.expand(b, 1), bias.expand(b, 1))
    # The same elementwise operations on the same values: equal to the last bit.
    assert per_row.item() == siglip_loss(images, texts, scale, bias).item()


def test_bf16_embeddings_are_scored_in_fp32():
    images, texts, scale, bias = inputs()
    images, texts = images.bfloat16(), texts.bfloat16()
    loss = siglip_loss(images, texts, scale, bias)
    assert loss.dtype == torch.float32
    # Upcasting first is the whole difference, so the values agree exactly.
    assert loss.item() == siglip_loss(images.float(), texts.float(), scale, bias).item()


def test_the_paper_initialisation_starts_pairs_near_no_match():
    # Scale 10 and bias -10: an identical pair has logit 0, any other below it.
    model = ModelConfig()
    assert math.exp(model.siglip_logit_scale_init) == pytest.approx(10.0, rel=1e-6)
    assert model.siglip_logit_bias_init == -10.0


def test_an_unknown_exchange_is_an_error_naming_the_choices():
    images, texts, scale, bias = inputs()
    with pytest.raises(ValueError, match=r"gather.*ring"):
        siglip_loss(images, texts, scale, bias, exchange="allreduce")
