"""Captioning (CoCa): next-token labels, per-row causal fusion, gradients, training with either embedding
objective, and greedy generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bigmodel.config import ConfigError, load_config
from bigmodel.config.layout import active_objectives
from bigmodel.config.schema import LossWeights, ModelConfig
from bigmodel.losses import total_loss
from bigmodel.models import build_model
from bigmodel.models.encoder import next_token_labels, padding_mask
from bigmodel.models.generate import greedy_captions

TINY = str(Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml")
CAPTION = ["--model.text_causal=true", "--train.loss_weights.mlm=0", "--train.loss_weights.caption=1"]
BOS, EOS, PAD = 3, 4, 0
LENGTHS = (10, 6, 8, 4)  # real tokens per caption, BOS and EOS included
CONTEXT = 10


def tiny_config() -> ModelConfig:
    return ModelConfig(
        image_size=16, patch_size=8, vision_width=32, vision_heads=2, vision_mlp_dim=64, vocab_size=50,
        context_length=CONTEXT, text_width=32, text_heads=2, text_mlp_dim=64, embed_dim=16, fusion="cross",
        fusion_layers=2, text_causal=True,
    )  # fmt: skip


def make_batch(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """BOS tokens EOS PAD... captions of LENGTHS real tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (len(LENGTHS), CONTEXT), generator=gen)
    positions = torch.arange(CONTEXT)
    lengths = torch.tensor(LENGTHS)[:, None]
    ids = torch.where(positions == 0, BOS, torch.where(positions == lengths - 1, EOS, ids))
    mask = (positions < lengths).long()
    return {
        "pixel_values": torch.randn(len(LENGTHS), cfg.channels, cfg.image_size, cfg.image_size, generator=gen),
        "input_ids": torch.where(mask.bool(), ids, PAD),
        "attention_mask": mask,
    }


def test_labels_are_the_next_real_token() -> None:
    ids = torch.tensor([[3, 7, 8, 4, 0, 0], [3, 9, 9, 9, 9, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    expected = torch.tensor([[7, 8, 4, -100, -100, -100], [9, 9, 9, 9, 4, -100]])
    assert torch.equal(next_token_labels(ids, mask), expected)


def test_padding_mask_is_causal_per_row() -> None:
    mask = padding_mask(torch.tensor([[1, 1, 0], [1, 1, 0]]), causal=torch.tensor([1.0, 0.0]))
    assert mask.shape == (2, 1, 3, 3)
    causal = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    bidirectional = torch.tensor([[1, 1, 0]] * 3, dtype=torch.bool)
    assert torch.equal(mask[0, 0], causal) and torch.equal(mask[1, 0], bidirectional)


def test_caption_rows_are_causal_and_itm_rows_are_not() -> None:
    model = build_model(tiny_config(), ("contrastive", "itm", "caption")).eval()
    model.every_position = True  # caption logits (B, L, V) at every position
    batch = make_batch(model.cfg)
    changed = {**batch, "input_ids": batch["input_ids"].clone()}
    t = 4  # caption 0 is real throughout; change its tokens after position t
    changed["input_ids"][0, t + 1 :] = (changed["input_ids"][0, t + 1 :] + 1) % model.cfg.vocab_size
    with torch.no_grad():
        before, after = model(batch), model(changed)
    # Positions up to t see the same tokens through causal text blocks and causal fusion rows: the same ops on the
    # same values, so bit-identical. Positions after t read the changed tokens.
    assert torch.equal(before["caption_logits"][0, : t + 1], after["caption_logits"][0, : t + 1])
    assert not torch.allclose(before["caption_logits"][0, t + 1 :], after["caption_logits"][0, t + 1 :])
    # ITM reads the fused begin-of-text token (position 0): it changes only if the ITM rows attend bidirectionally.
    # Rows 0 (the true pair) and 1 + B (caption 0 as sample 1's negative) hold the changed caption.
    b = len(LENGTHS)
    for row in (0, b + 1):
        assert not torch.allclose(before["itm_logits"][row], after["itm_logits"][row], atol=1e-6)
    # Caption 0 is nowhere in ITM row 2 (caption 2 with image 2): its bidirectional row is untouched.
    assert torch.equal(before["itm_logits"][2], after["itm_logits"][2])


@pytest.mark.parametrize("objectives", [("contrastive", "itm", "caption"), ("siglip", "caption"), ("caption",)])
def test_every_parameter_gets_a_gradient(objectives: tuple[str, ...]) -> None:
    model = build_model(tiny_config(), objectives)
    loss, parts = total_loss(model(make_batch(model.cfg)), LossWeights(**dict.fromkeys(objectives, 1.0), mlm=0.0))
    assert sorted(parts) == sorted(objectives)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{name} gets no gradient"


def test_decode_gives_the_training_logits() -> None:
    model = build_model(tiny_config(), ("contrastive", "caption")).eval()
    batch = make_batch(model.cfg)
    with torch.no_grad():
        trained = model(batch)["caption_logits"]  # (M, V) at the positions that have a next token
        image = model.vision(batch["pixel_values"])
        decoded = torch.cat(
            [model.decode(image[i : i + 1], batch["input_ids"][i : i + 1, : n - 1])[0] for i, n in enumerate(LENGTHS)]
        )
    # The same modules on the same tokens; only the batch composition and the padded key columns of the training
    # forward differ, which changes summation order by a few fp32 ulps of logits of order 1.
    torch.testing.assert_close(decoded, trained, rtol=0, atol=1e-5)


@pytest.mark.parametrize("embedding", ["contrastive", "siglip"])
def test_caption_with_an_embedding_objective_builds_and_trains(embedding: str) -> None:
    overrides = [*CAPTION, "--train.loss_weights.itm=0"]
    if embedding == "siglip":
        overrides += ["--train.loss_weights.contrastive=0", "--train.loss_weights.siglip=1"]
    cfg = load_config(TINY, overrides)
    objectives = active_objectives(cfg.train.loss_weights)
    assert objectives == (embedding, "caption")
    model = build_model(cfg.model, objectives)
    batch = make_batch(cfg.model) | {"pixel_values": torch.randn(len(LENGTHS), 3, 32, 32)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss, parts = total_loss(model(batch), cfg.train.loss_weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(parts["caption"].item())
    # Ten Adam steps on one batch of a vocabulary of 128: the caption loss starts near ln(128) = 4.85 and falls
    # by well over 10% (measured, contrastive: 4.87 -> 3.72); an unlearnable or detached head would not move.
    assert losses[-1] < 0.9 * losses[0], losses


def test_caption_without_causal_text_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model\.text_causal=true") as error:
        load_config(TINY, ["--train.loss_weights.mlm=0", "--train.loss_weights.caption=1"])
    assert "\n" not in str(error.value)


def biased_model(token: int) -> torch.nn.Module:
    """A caption model whose decoder always prefers `token`."""
    model = build_model(tiny_config(), ("caption",)).eval()
    with torch.no_grad():
        model.caption_head.decoder.bias[token] = 100.0
    return model


def test_generation_stops_at_eos() -> None:
    pixels = make_batch(tiny_config())["pixel_values"]
    assert greedy_captions(biased_model(EOS), pixels, BOS, EOS, max_tokens=5) == [[]] * len(LENGTHS)


def test_generation_stops_at_max_tokens_and_the_context_length() -> None:
    model, pixels = biased_model(7), make_batch(tiny_config())["pixel_values"][:2]
    assert greedy_captions(model, pixels, BOS, EOS, max_tokens=3) == [[7, 7, 7]] * 2
    assert greedy_captions(model, pixels, BOS, EOS) == [[7] * (CONTEXT - 1)] * 2  # BOS takes the first position
