"""The analytic parameter and FLOP counts against a real model: its parameters and FlopCounterMode's count."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bigmodel.config.schema import ModelConfig
from bigmodel.models import build_model
from bigmodel.models.flops import PARTS, count_parameters, flops_per_sample

BATCH, TEXT_TOKENS, MASKED = 4, 12, 3

# (fusion, objectives): every fusion kind with every objective it supports.
LAYOUTS = [
    ("none", ("contrastive",)),
    ("merged", ("contrastive", "itm", "mlm")),
    ("cross", ("contrastive", "itm", "mlm")),
    ("cross", ("mlm",)),
    ("cross", ("contrastive", "itm", "caption")),  # every caption position has a next token: TEXT_TOKENS - 1 scored
]


def tiny_config(fusion: str) -> ModelConfig:
    # Widths, depths and token counts all differ, so a formula that swaps two of them fails.
    return ModelConfig(
        image_size=24,
        patch_size=8,
        vision_width=48,
        vision_layers=2,
        vision_heads=4,
        vision_mlp_dim=80,
        vocab_size=40,
        context_length=16,
        text_width=32,
        text_layers=3,
        text_heads=2,
        text_mlp_dim=72,
        embed_dim=24,
        fusion=fusion,
        fusion_layers=0 if fusion == "none" else 2,
    )


def make_batch(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A batch whose captions are TEXT_TOKENS long with exactly MASKED MLM labels each (positions 1..MASKED)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (BATCH, TEXT_TOKENS), generator=gen)
    labels = torch.full_like(ids, -100)
    labels[:, 1 : 1 + MASKED] = ids[:, 1 : 1 + MASKED]
    return {
        "pixel_values": torch.randn(BATCH, cfg.channels, cfg.image_size, cfg.image_size, generator=gen),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mlm_input_ids": ids,
        "mlm_labels": labels,
    }


def measured_flops_per_sample(cfg: ModelConfig, objectives: tuple[str, ...]) -> dict[str, int]:
    """FLOPs per part counted by torch on one forward, divided by the batch size."""
    model = build_model(cfg, objectives)
    # The CPU's fused attention kernel has no FLOP formula in FlopCounterMode and would count as 0; the math backend
    # computes attention with bmm, which it does count.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(make_batch(cfg))
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    measured = {"forward": per_module["MultimodalEncoder"]}
    for part in ("vision", "text", "fusion"):
        # The encoder calls each tower's pieces (embedding, blocks) directly, so sum the part's direct children.
        prefix = f"MultimodalEncoder.{part}."
        measured[part] = sum(n for name, n in per_module.items() if name.startswith(prefix) and name.count(".") == 2)
    head_names = ("contrastive", "itm_head", "mlm_head", "caption_head")
    measured["heads"] = sum(per_module.get(f"MultimodalEncoder.{name}", 0) for name in head_names)
    return {name: count // BATCH for name, count in measured.items()}


@pytest.mark.parametrize(("fusion", "objectives"), LAYOUTS)
def test_flops_match_flop_counter(fusion: str, objectives: tuple[str, ...]) -> None:
    cfg = tiny_config(fusion)
    analytic = flops_per_sample(cfg, objectives, text_tokens=TEXT_TOKENS, masked_tokens=MASKED)
    measured = measured_flops_per_sample(cfg, objectives)
    # Exact: both sides count 2 m n k per matmul of the same shapes and nothing else, and the MLM head's positions
    # are fixed by the labels, so no expectation or rounding enters.
    for part in (*PARTS, "forward"):
        assert analytic[part] == measured[part], f"{part}: analytic {analytic[part]} != measured {measured[part]}"
    assert analytic["train"] == 3 * analytic["forward"]


def test_default_text_tokens_and_masked_positions() -> None:
    cfg = tiny_config("cross")
    explicit = flops_per_sample(cfg, text_tokens=cfg.context_length, masked_tokens=0.15 * cfg.context_length)
    assert flops_per_sample(cfg) == explicit


@pytest.mark.parametrize(("fusion", "objectives"), LAYOUTS)
def test_count_parameters_matches_model(fusion: str, objectives: tuple[str, ...]) -> None:
    cfg = tiny_config(fusion)
    model = build_model(cfg, objectives)

    def size(*modules: str) -> int:
        return sum(p.numel() for name in modules if hasattr(model, name) for p in getattr(model, name).parameters())

    expected = {
        "vision": size("vision"),
        "text": size("text"),
        "fusion": size("fusion"),
        "heads": size("contrastive", "itm_head", "mlm_head", "caption_head"),
        "total": sum(p.numel() for p in model.parameters()),
    }
    assert count_parameters(cfg, objectives) == expected


@pytest.mark.parametrize(
    ("objectives", "message"),
    [(("itm",), r"objectives \['itm'\] need fused text"), (("retrieval",), "must be a non-empty subset")],
)
def test_impossible_objectives_are_refused(objectives: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        flops_per_sample(tiny_config("none"), objectives)


def test_text_tokens_beyond_context_are_refused() -> None:
    with pytest.raises(ValueError, match=r"text_tokens=17 must be between 1 and model\.context_length=16"):
        flops_per_sample(tiny_config("cross"), text_tokens=17)


def test_count_parameters_of_a_10b_config_allocates_nothing() -> None:
    # Materialising this config would take ~40 GB; on the meta device it costs milliseconds. The reference is the
    # closed form of a dual encoder's parameters.
    cfg = ModelConfig(
        image_size=224,
        patch_size=14,
        vision_width=4096,
        vision_layers=48,
        vision_heads=32,
        vision_mlp_dim=16384,
        vocab_size=50_000,
        context_length=77,
        text_width=4096,
        text_layers=48,
        text_heads=32,
        text_mlp_dim=16384,
        embed_dim=1024,
        fusion="none",
        fusion_layers=0,
    )

    def block(width: int, mlp_dim: int) -> int:  # 4 attention projections, 2 LayerNorms, MLP
        return 4 * (width * width + width) + 2 * 2 * width + 2 * width * mlp_dim + mlp_dim + width

    patches = (224 // 14) ** 2
    vision = 3 * 14**2 * 4096 + 4096 + (patches + 1) * 4096 + 2 * 2 * 4096 + 48 * block(4096, 16384)
    text = 50_000 * 4096 + 77 * 4096 + 2 * 4096 + 48 * block(4096, 16384)
    heads = 2 * 4096 * 1024 + 1
    expected = {"vision": vision, "text": text, "fusion": 0, "heads": heads, "total": vision + text + heads}
    assert count_parameters(cfg, ("contrastive",)) == expected
    assert expected["total"] > 10**10
