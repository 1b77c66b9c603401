"""Parameter and FLOP counts of the multimodal encoder, from its config alone.

Parts are named after the model's top-level modules: vision, text, fusion, and heads (contrastive projections and
logit scale, ITM classifier, MLM head, captioning decoder).
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from bigmodel.config.schema import ModelConfig
from bigmodel.models.encoder import DEFAULT_OBJECTIVES, OBJECTIVES, MultimodalEncoder, image_tokens

PARTS = ("vision", "text", "fusion", "heads")

# Expected share of caption tokens the MLM head runs on by default (DataConfig.mlm_probability's default).
DEFAULT_MLM_PROBABILITY = 0.15


def count_parameters(cfg: ModelConfig, objectives: Collection[str] = DEFAULT_OBJECTIVES) -> dict[str, int]:
    """Parameters per part (vision, text, fusion, heads) and their total, for MultimodalEncoder(cfg, objectives).

    The model is built on the meta device, so no memory is allocated whatever the size of the config.
    """
    with torch.device("meta"):
        model = MultimodalEncoder(cfg, objectives)
    counts = dict.fromkeys(PARTS, 0)
    for name, param in model.named_parameters():
        part = name.split(".", 1)[0]
        counts[part if part in counts else "heads"] += param.numel()
    counts["total"] = sum(counts.values())
    return counts


def _linear(tokens: int, d_in: int, d_out: int) -> int:
    """A (tokens, d_in) @ (d_in, d_out) matmul; the bias add is not counted."""
    return 2 * tokens * d_in * d_out


def _attention(queries: int, keys: int, width: int) -> int:
    """Scores Q K^T and the weighted sum of V, all heads together (heads * head_dim = width), masks ignored."""
    return 2 * _linear(queries, width, keys)


def _block(tokens: int, width: int, mlp_dim: int, context: int = 0) -> int:
    """One pre-LN block on `tokens` tokens; with `context` > 0, plus cross-attention to that many tokens."""
    flops = 4 * _linear(tokens, width, width) + _attention(tokens, tokens, width)
    if context:
        # Queries and output projection on the tokens; keys and values on the context.
        flops += 2 * _linear(tokens, width, width) + 2 * _linear(context, width, width)
        flops += _attention(tokens, context, width)
    return flops + _linear(tokens, width, mlp_dim) + _linear(tokens, mlp_dim, width)


def _vision_forward(cfg: ModelConfig, image: int) -> int:
    """The patch embedding (on every patch) and the blocks on `image` tokens."""
    patches = (cfg.image_size // cfg.patch_size) ** 2
    patch_embedding = _linear(patches, cfg.channels * cfg.patch_size**2, cfg.vision_width)
    return patch_embedding + cfg.vision_layers * _block(image, cfg.vision_width, cfg.vision_mlp_dim)


def _text_forward(cfg: ModelConfig, tokens: int) -> int:
    return cfg.text_layers * _block(tokens, cfg.text_width, cfg.text_mlp_dim)


def _fusion_forward(cfg: ModelConfig, text_tokens: int, rows: int, image: int) -> int:
    """Fusing `rows` captions with one sample's `image` tokens: the image is projected once, the blocks run per row."""
    image_proj = _linear(image, cfg.vision_width, cfg.text_width)
    if cfg.fusion == "merged":
        block = _block(text_tokens + image, cfg.text_width, cfg.text_mlp_dim)
    else:
        block = _block(text_tokens, cfg.text_width, cfg.text_mlp_dim, context=image)
    return image_proj + rows * cfg.fusion_layers * block


def flops_per_sample(
    cfg: ModelConfig,
    objectives: Collection[str] = DEFAULT_OBJECTIVES,
    text_tokens: int | None = None,
    masked_tokens: float | None = None,
) -> dict[str, float]:
    """Matmul and attention FLOPs of one sample through MultimodalEncoder(cfg, objectives).forward.

    Returns the forward FLOPs per part (vision, text, fusion, heads), their sum `forward`, and `train` = 3 x the
    training forward (the backward pass computes gradients for activations and for weights, each costing about one
    forward). The two forwards differ under patch dropout: training runs the vision blocks and the fusion's image
    context on the kept patches (`image_tokens(cfg, training=True)`), the parts and `forward` count every patch.

    text_tokens: caption length the text tower runs on (padding included; default cfg.context_length).
    masked_tokens: positions per caption the MLM head runs on; default the expected count
        DEFAULT_MLM_PROBABILITY * text_tokens. A fractional expectation makes the counts fractional.

    What is counted follows the forward: the text tower runs once for contrastive, itm and/or caption and once more
    on the masked caption for mlm; the fusion blocks run on 2 rows per sample for itm (the true pair and the
    neighbour's caption), on 1 for mlm and on 1 for caption, after projecting the sample's image tokens once; the
    caption decoder runs on the text_tokens - 1 positions that have a next token (no padding assumed). A matmul
    (m, k) @ (k, n) costs 2 m n k; attention is counted dense, as the kernels compute it (padding and causal masks
    save nothing). Not counted: elementwise ops, norms, softmax, embeddings lookups, the loss (the B x B contrastive
    similarity adds 2 B embed_dim per sample), and the recomputation that activation checkpointing adds in training.
    """
    _check_objectives(cfg, objectives)
    tokens = cfg.context_length if text_tokens is None else text_tokens
    if not 1 <= tokens <= cfg.context_length:
        raise ValueError(f"text_tokens={tokens} must be between 1 and model.context_length={cfg.context_length}")
    masked = DEFAULT_MLM_PROBABILITY * tokens if masked_tokens is None else masked_tokens
    text_runs = _text_copies(objectives)
    fusion_runs = _fused_rows(objectives)
    width = cfg.text_width
    heads: float = 0
    if {"contrastive", "siglip"} & set(objectives):
        heads += _linear(1, cfg.vision_width, cfg.embed_dim) + _linear(1, width, cfg.embed_dim)
    if "itm" in objectives:
        heads += 2 * _linear(1, width, 2)
    if "mlm" in objectives:
        heads += masked * (_linear(1, width, width) + _linear(1, width, cfg.vocab_size))
    if "caption" in objectives:
        heads += (tokens - 1) * _linear(1, width, cfg.vocab_size)

    def parts(image: int) -> dict[str, float]:
        return {
            "vision": _vision_forward(cfg, image),
            "text": text_runs * _text_forward(cfg, tokens),
            "fusion": _fusion_forward(cfg, tokens, fusion_runs, image) if fusion_runs else 0,
            "heads": heads,
        }

    flops = parts(image_tokens(cfg))
    flops["forward"] = sum(flops.values())
    flops["train"] = 3 * sum(parts(image_tokens(cfg, training=True)).values())
    return flops


def _check_objectives(cfg: ModelConfig, objectives: Collection[str]) -> None:
    unknown = set(objectives) - set(OBJECTIVES)
    if unknown or not objectives:
        raise ValueError(f"objectives {sorted(objectives)} must be a non-empty subset of {OBJECTIVES}")
    fused = sorted(set(objectives) & {"itm", "mlm", "caption"})
    if fused and cfg.fusion == "none":
        raise ValueError(f"objectives {fused} need fused text, but model.fusion=none")


def _text_copies(objectives: Collection[str]) -> int:
    """Caption copies through the text tower: the plain one (contrastive, siglip, itm, caption), the masked (mlm)."""
    return int(bool({"contrastive", "siglip", "itm", "caption"} & set(objectives))) + int("mlm" in objectives)


def _fused_rows(objectives: Collection[str]) -> int:
    """Fused rows per sample: ITM's true pair and neighbour pair, MLM's masked caption, captioning's caption."""
    return 2 * int("itm" in objectives) + int("mlm" in objectives) + int("caption" in objectives)


def flops_per_block(cfg: ModelConfig, objectives: Collection[str], stack: str, text_tokens: int | None = None) -> float:
    """Forward FLOPs per sample of one block of `stack` ("vision", "text" or "fusion"), as the forward runs it:
    text blocks once per caption copy, fusion blocks once per fused row, on the image tokens training sees (the
    pipeline balances stages with this)."""
    tokens = cfg.context_length if text_tokens is None else text_tokens
    image = image_tokens(cfg, training=True)
    if stack == "vision":
        return _block(image, cfg.vision_width, cfg.vision_mlp_dim)
    if stack == "text":
        return _text_copies(objectives) * _block(tokens, cfg.text_width, cfg.text_mlp_dim)
    rows = _fused_rows(objectives)
    if cfg.fusion == "merged":
        return rows * _block(tokens + image, cfg.text_width, cfg.text_mlp_dim)
    return rows * _block(tokens, cfg.text_width, cfg.text_mlp_dim, context=image)
