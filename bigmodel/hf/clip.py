"""Conversion between bigmodel's dual encoder and transformers' CLIPModel: configs and state dicts.

With `fusion: none` and the contrastive objective only, a MultimodalEncoder holds exactly CLIPModel's tensors under
other names: the blocks follow CLIPEncoderLayer's names, our learned positions are Parameters (N, D) where CLIP
has an nn.Embedding whose `.weight` is the same (N, D) tensor, and nothing needs reshaping. The state-dict
functions are pure name mappings applied tensor by tensor (`clip_key`, `bigmodel_key`), so a streaming converter
can reuse them on one tensor at a time.

Two behaviours differ and are harmless for the inputs the conversion is meant for:
  - bigmodel pools a caption at its last real token (right padding assumed); CLIP pools at the first
    `eos_token_id`. They agree when each caption ends in its end-of-text token and no earlier token has that id.
  - bigmodel clamps the logit scale at exp(logit_scale_max); CLIP never clamps. They agree while the stored
    logit_scale is at most logit_scale_max (CLIP training clamps it at ln 100, bigmodel's default maximum).

transformers is an optional extra (`pip install bigmodel[hf]`), imported only inside the config functions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch

from bigmodel.config.errors import ConfigError
from bigmodel.config.schema import ModelConfig

if TYPE_CHECKING:
    from transformers import CLIPConfig

# bigmodel's activation name -> transformers' ACT2FN name of the same function (not merely an approximation of it).
_HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
_BIGMODEL_ACTIVATIONS = {hf: ours for ours, hf in _HF_ACTIVATIONS.items()}

# bigmodel name -> CLIPModel name, for every tensor outside the Transformer blocks.
_OUTSIDE_BLOCKS = {
    "vision.patch_embedding.weight": "vision_model.embeddings.patch_embedding.weight",
    "vision.class_embedding": "vision_model.embeddings.class_embedding",
    "vision.position_embedding": "vision_model.embeddings.position_embedding.weight",
    "vision.pre_norm.weight": "vision_model.pre_layrnorm.weight",
    "vision.pre_norm.bias": "vision_model.pre_layrnorm.bias",
    "vision.post_norm.weight": "vision_model.post_layernorm.weight",
    "vision.post_norm.bias": "vision_model.post_layernorm.bias",
    "text.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "text.position_embedding": "text_model.embeddings.position_embedding.weight",
    "text.final_norm.weight": "text_model.final_layer_norm.weight",
    "text.final_norm.bias": "text_model.final_layer_norm.bias",
    "contrastive.visual_projection.weight": "visual_projection.weight",
    "contrastive.text_projection.weight": "text_projection.weight",
    "contrastive.logit_scale": "logit_scale",
}
_OUTSIDE_BLOCKS_FROM_CLIP = {clip: ours for ours, clip in _OUTSIDE_BLOCKS.items()}

# Tensor names inside one block; identical on both sides, since bigmodel's Block follows CLIPEncoderLayer.
_BLOCK_TENSORS = frozenset(
    f"{module}.{kind}"
    for module in (
        "layer_norm1",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "layer_norm2",
        "mlp.fc1",
        "mlp.fc2",
    )
    for kind in ("weight", "bias")
)
_BIGMODEL_BLOCK = re.compile(r"(vision|text)\.blocks\.layers\.(\d+)\.(.+)")
_CLIP_BLOCK = re.compile(r"(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)")

# Non-persistent buffers that checkpoints written by older transformers still contain; CLIPModel rebuilds them.
_CLIP_BUFFERS = frozenset({"vision_model.embeddings.position_ids", "text_model.embeddings.position_ids"})


def clip_key(name: str) -> str:
    """The CLIPModel name of bigmodel tensor `name`; ValueError (one line) if CLIP has no such tensor."""
    if name in _OUTSIDE_BLOCKS:
        return _OUTSIDE_BLOCKS[name]
    match = _BIGMODEL_BLOCK.fullmatch(name)
    if match and match[3] in _BLOCK_TENSORS:
        tower, layer, tensor = match.groups()
        return f"{tower}_model.encoder.layers.{layer}.{tensor}"
    raise ValueError(
        f"bigmodel tensor {name!r} has no CLIPModel counterpart; only fusion=none with the contrastive head converts"
    )


def bigmodel_key(clip_name: str) -> str | None:
    """The bigmodel name of CLIPModel tensor `clip_name`, or None for a buffer CLIPModel rebuilds (position_ids).

    ValueError (one line) for a tensor bigmodel has no place for.
    """
    if clip_name in _CLIP_BUFFERS:
        return None
    if clip_name in _OUTSIDE_BLOCKS_FROM_CLIP:
        return _OUTSIDE_BLOCKS_FROM_CLIP[clip_name]
    match = _CLIP_BLOCK.fullmatch(clip_name)
    if match and match[3] in _BLOCK_TENSORS:
        tower, layer, tensor = match.groups()
        return f"{tower}.blocks.layers.{layer}.{tensor}"
    raise ValueError(f"CLIPModel tensor {clip_name!r} has no bigmodel counterpart")


def _first_missing(names: Iterable[str]) -> str | None:
    """The first (sorted) bigmodel tensor name a complete dual encoder needs but `names` lacks.

    The layer count is read from the names themselves: every layer up to the highest index present must be
    complete. A state dict missing only its trailing layers cannot be told apart from a shallower model; loading
    it into a model of the intended depth (strict) reports those.
    """
    names = set(names)
    required = set(_OUTSIDE_BLOCKS)
    for tower in ("vision", "text"):
        layers = [int(m[2]) for m in map(_BIGMODEL_BLOCK.fullmatch, names) if m and m[1] == tower]
        for layer in range(max(layers, default=0) + 1):
            required.update(f"{tower}.blocks.layers.{layer}.{tensor}" for tensor in _BLOCK_TENSORS)
    return min(required - names, default=None)


def bigmodel_to_clip_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A MultimodalEncoder state dict (fusion none, contrastive only) renamed for CLIPModel; tensors are not copied.

    ValueError (one line, naming the tensor) for a tensor CLIP has no place for or a missing one.
    """
    converted = {clip_key(name): tensor for name, tensor in state_dict.items()}
    if "logit_scale" in converted:
        converted["logit_scale"] = converted["logit_scale"].reshape(())  # CLIPModel's is a scalar, ours (1,)
    missing = _first_missing(state_dict)
    if missing is not None:
        raise ValueError(f"bigmodel state dict lacks {missing!r}, which CLIPModel needs")
    return converted


def clip_to_bigmodel_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPModel state dict renamed for MultimodalEncoder (fusion none, contrastive only); tensors are not copied.

    position_ids buffers are dropped. ValueError (one line, naming the tensor) for an unknown or a missing tensor.
    """
    converted = {}
    for clip_name, tensor in state_dict.items():
        name = bigmodel_key(clip_name)
        if name is not None:
            converted[name] = tensor.reshape(1) if name == "contrastive.logit_scale" else tensor
    missing = _first_missing(converted)
    if missing is not None:
        raise ValueError(f"CLIP state dict lacks {clip_key(missing)!r}, which bigmodel needs")
    return converted


def _check_representable(cfg: ModelConfig, eos_token_id: int) -> None:
    """ConfigError (one line: the field and the fix) for a model CLIPModel cannot express."""
    if cfg.fusion != "none":
        raise ConfigError(f"model.fusion={cfg.fusion}: CLIPModel is a dual encoder; only model.fusion=none converts")
    if not cfg.text_causal:
        raise ConfigError("model.text_causal=false: CLIP's text tower is always causal; only text_causal=true converts")
    if cfg.dropout > 0:
        raise ConfigError(
            f"model.dropout={cfg.dropout}: CLIP has no dropout on residual branches; set model.dropout=0 for export "
            "(dropout acts only in training)"
        )
    if not 0 <= eos_token_id < cfg.vocab_size:
        raise ConfigError(f"eos_token_id={eos_token_id} is outside the vocabulary [0, {cfg.vocab_size})")
    if eos_token_id == 2:
        raise ConfigError(
            "eos_token_id=2 makes transformers' CLIP pool at the highest token id (its legacy behaviour), not at "
            "the end-of-text token; CLIP cannot represent a tokenizer whose end-of-text id is 2"
        )


def clip_config_from_model_config(
    cfg: ModelConfig, eos_token_id: int = 4, pad_token_id: int = 0, bos_token_id: int | None = 3
) -> CLIPConfig:
    """The CLIPConfig of the CLIPModel that computes what MultimodalEncoder(cfg, ("contrastive",)) computes.

    The token ids are the tokenizer's; CLIP's text tower pools at the first `eos_token_id`. ConfigError (a
    ValueError, one line) for what CLIP cannot represent: fusion other than none, bidirectional text, dropout,
    an end-of-text id outside the vocabulary or equal to 2 (transformers' legacy pooling).
    """
    _check_representable(cfg, eos_token_id)
    from transformers import CLIPConfig

    shared = {
        "hidden_act": _HF_ACTIVATIONS[cfg.activation],
        "layer_norm_eps": cfg.norm_eps,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "projection_dim": cfg.embed_dim,
    }
    text = {
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.context_length,
        "hidden_size": cfg.text_width,
        "num_hidden_layers": cfg.text_layers,
        "num_attention_heads": cfg.text_heads,
        "intermediate_size": cfg.text_mlp_dim,
        "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        **shared,
    }
    vision = {
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.channels,
        "hidden_size": cfg.vision_width,
        "num_hidden_layers": cfg.vision_layers,
        "num_attention_heads": cfg.vision_heads,
        "intermediate_size": cfg.vision_mlp_dim,
        **shared,
    }
    return CLIPConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=cfg.embed_dim,
        logit_scale_init_value=cfg.logit_scale_init,
    )


def _same_in_both_towers(clip_cfg: CLIPConfig, field: str) -> object:
    """The value of `field` in text_config, after checking vision_config agrees (bigmodel has one for both)."""
    text, vision = getattr(clip_cfg.text_config, field), getattr(clip_cfg.vision_config, field)
    if text != vision:
        raise ConfigError(
            f"text_config.{field}={text} differs from vision_config.{field}={vision}; bigmodel uses one value for "
            "both towers"
        )
    return text


def _square_side(value: int | tuple[int, int] | list[int], field: str) -> int:
    """An image or patch side given as an int or as a (height, width) pair; ConfigError unless square."""
    if isinstance(value, int):
        return value
    if len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    raise ConfigError(f"vision_config.{field}={value} is not square; bigmodel supports square images and patches")


def model_config_from_clip_config(clip_cfg: CLIPConfig) -> ModelConfig:
    """The ModelConfig (fusion none, causal text) of the dual encoder that computes what CLIPModel(clip_cfg) does.

    ConfigError (a ValueError, one line) when the towers use different activations or LayerNorm epsilons,
    an activation bigmodel lacks, attention dropout, or non-square images. init_std is taken from
    text_config.initializer_range (it matters only for initialisation); token ids are not part of ModelConfig.
    """
    activation = _same_in_both_towers(clip_cfg, "hidden_act")
    if activation not in _BIGMODEL_ACTIVATIONS:
        raise ConfigError(f"hidden_act={activation} is not supported; use one of {sorted(_BIGMODEL_ACTIVATIONS)}")
    norm_eps = _same_in_both_towers(clip_cfg, "layer_norm_eps")
    if _same_in_both_towers(clip_cfg, "attention_dropout"):
        raise ConfigError("attention_dropout > 0: bigmodel has no dropout on attention probabilities; set it to 0")
    text, vision = clip_cfg.text_config, clip_cfg.vision_config
    return ModelConfig(
        image_size=_square_side(vision.image_size, "image_size"),
        patch_size=_square_side(vision.patch_size, "patch_size"),
        channels=vision.num_channels,
        vision_width=vision.hidden_size,
        vision_layers=vision.num_hidden_layers,
        vision_heads=vision.num_attention_heads,
        vision_mlp_dim=vision.intermediate_size,
        vocab_size=text.vocab_size,
        context_length=text.max_position_embeddings,
        text_width=text.hidden_size,
        text_layers=text.num_hidden_layers,
        text_heads=text.num_attention_heads,
        text_mlp_dim=text.intermediate_size,
        text_causal=True,
        embed_dim=clip_cfg.projection_dim,
        fusion="none",
        fusion_layers=0,
        activation=_BIGMODEL_ACTIVATIONS[activation],
        dropout=0.0,
        norm_eps=norm_eps,
        init_std=text.initializer_range,
        logit_scale_init=clip_cfg.logit_scale_init_value,
    )
