"""Checkpoints to and from OpenCLIP: `import_openclip` turns an OpenCLIP model config JSON and its weights into a
bigmodel run; `export_openclip` writes a folder that `open_clip.create_model_and_transforms("local-dir:OUT")`
loads unchanged (open_clip_config.json with the model and preprocessing configs, open_clip_model.safetensors).

An OpenCLIP `CLIP` whose towers are its own ViT (class-token pooling) and text Transformer (pooling at the
end-of-text token) holds bigmodel's dual encoder (fusion none, contrastive only) with three differences of layout:
  - its attention keeps q, k and v as one fused `in_proj_weight` (3D, D) and `in_proj_bias` (3D,), in that order
    (nn.MultiheadAttention); bigmodel's blocks keep three nn.Linear;
  - its projections `visual.proj` (Dv, E) and `text_projection` (Dt, E) are applied as x @ proj, the transpose of
    bigmodel's nn.Linear weights (E, D);
  - its logit_scale is a scalar, bigmodel's has shape (1,).
Everything else is a renaming. Configs bigmodel cannot express (a timm or transformers tower, attentional pooling,
layer scale, custom attention blocks, SigLIP's bias, ...) are one-line ConfigErrors naming the field.

As with transformers' CLIP (see `bigmodel.hf.clip`), bigmodel clamps the logit scale at model.logit_scale_max where
OpenCLIP's model never clamps (its training does, at ln 100): they agree while the stored value is at most that.
Neither open_clip nor transformers is imported here; weights are read with safetensors or torch.load(weights_only).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

from bigmodel.checkpoint.manifest import verify_manifest
from bigmodel.checkpoint.run import resolve_checkpoint
from bigmodel.checkpoint.tools import ModelTensors, SafetensorsEntry, saved_config, write_safetensors
from bigmodel.config.errors import ConfigError
from bigmodel.config.schema import ModelConfig
from bigmodel.data.tokenizer import CaptionTokenizer, load_tokenizer

CONFIG_FILE = "open_clip_config.json"
"""What `export_openclip` writes: {"model_cfg": ..., "preprocess_cfg": ...}, the layout open_clip's local-dir: and
hf-hub: schemas read."""
WEIGHTS_FILE = "open_clip_model.safetensors"
"""The weights file of an export, the first name open_clip looks for in a local-dir: folder."""
MODEL_CONFIG_FILE = "open_clip_model.json"
"""The bare model config of an export, for `open_clip.add_model_config(file)` then
`create_model_and_transforms("open_clip_model", pretrained=".../open_clip_model.safetensors")`."""

_OPENCLIP_EPS = 1e-5  # open_clip's LayerNorm default, used where a tower's norm_kwargs give no eps
_OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]  # open_clip's PreprocessCfg defaults (OpenAI's statistics)
_OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]

_BLOCK_OPTIONS = {
    "block_type": (None, "default"),
    "qk_norm": (False,),
    "scaled_cosine_attn": (False,),
    "scale_heads": (False,),
    "scale_attn_inner": (False,),
    "scale_attn": (False,),
    "scale_fc": (False,),
}
"""Transformer-block options of either tower and the values bigmodel's blocks compute."""

# Fields that must hold one of the listed values (OpenCLIP's defaults: what bigmodel's towers compute). Fields in
# neither table are unknown to this converter and refused, so a new OpenCLIP option is never silently dropped.
_FIXED = {
    "": {"init_logit_bias": (None,), "custom_text": (False,), "multimodal_cfg": (None,)},
    "vision_cfg": {
        "ls_init_value": (None,),
        "attentional_pool": (False,),
        "no_ln_pre": (False,),
        "pos_embed_type": ("learnable",),
        "pool_type": ("tok",),
        "timm_model_name": (None,),
        **_BLOCK_OPTIONS,
    },
    "text_cfg": {
        "hf_model_name": (None,),
        "ls_init_value": (None,),
        "embed_cls": (False,),
        "no_causal_mask": (False,),
        "pool_type": ("argmax", "eos"),
        "proj_type": ("linear",),
        "proj_bias": (False,),
        **_BLOCK_OPTIONS,
    },
}
# Fields bigmodel reads, or that do not change what the model computes (token ids, output options, the settings of a
# tower type that is not in use).
_FREE = {
    "": {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "nonscalar_logit_scale"},
    "vision_cfg": {
        "layers",
        "width",
        "head_width",
        "mlp_ratio",
        "patch_size",
        "image_size",
        "patch_dropout",
        "final_ln_after_pool",  # LayerNorm acts per token, so before or after picking the class token is the same
        "output_tokens",
        "act_kwargs",
        "norm_kwargs",
        "attn_pooler_queries",
        "attn_pooler_heads",
        "timm_model_pretrained",
        "timm_pool",
        "timm_proj",
        "timm_proj_bias",
        "timm_drop",
        "timm_drop_path",
    },
    "text_cfg": {
        "context_length",
        "vocab_size",
        "width",
        "heads",
        "layers",
        "mlp_ratio",
        "hf_tokenizer_name",
        "tokenizer_mode",
        "tokenizer_kwargs",
        "pad_id",
        "eos_id",
        "final_ln_after_pool",
        "output_tokens",
        "act_kwargs",
        "norm_kwargs",
        "hf_model_pretrained",
        "hf_proj_type",
        "hf_pooler_type",
    },
}
_DEFAULTS = {  # OpenCLIP's CLIPVisionCfg / CLIPTextCfg defaults for the fields bigmodel reads
    "vision_cfg": {"layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16, "image_size": 224},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12, "mlp_ratio": 4.0},
}
_DEFAULT_LOGIT_SCALE = 2.6592  # ln(1 / 0.07), OpenCLIP's init_logit_scale


def _check_fields(cfg: Mapping[str, Any], section: str) -> None:
    """ConfigError naming the first field of `section` ("" for the top level) that bigmodel cannot express."""
    prefix = f"{section}." if section else ""
    for field, value in cfg.items():
        allowed = _FIXED[section].get(field)
        if allowed is not None and value not in allowed:
            shown = "{...}" if isinstance(value, Mapping) else json.dumps(value)
            raise ConfigError(
                f"{prefix}{field}={shown}: bigmodel's dual encoder cannot express it; only "
                f"{' or '.join(json.dumps(a) for a in allowed)} converts"
            )
        if allowed is None and field not in _FREE[section]:
            raise ConfigError(f"{prefix}{field} is an OpenCLIP option bigmodel's converter does not know; remove it")


def _tower_activation(cfg: Mapping[str, Any], section: str, quick_gelu: bool) -> str:
    """bigmodel's activation name for one tower: QuickGELU, or nn.GELU with its act_kwargs."""
    kwargs = cfg.get("act_kwargs") or {}
    if quick_gelu:
        if kwargs:
            raise ConfigError(f"{section}.act_kwargs={json.dumps(kwargs)} with quick_gelu=true: QuickGELU takes none")
        return "quick_gelu"
    approximate = kwargs.get("approximate", "none")
    if set(kwargs) - {"approximate"} or approximate not in ("none", "tanh"):
        raise ConfigError(
            f"{section}.act_kwargs={json.dumps(kwargs)}: only nn.GELU's approximate none or tanh converts"
        )
    return "gelu" if approximate == "none" else "gelu_tanh"


def _tower_eps(cfg: Mapping[str, Any], section: str) -> float:
    kwargs = cfg.get("norm_kwargs") or {}
    if set(kwargs) - {"eps"}:
        raise ConfigError(f"{section}.norm_kwargs={json.dumps(kwargs)}: only LayerNorm's eps converts")
    return float(kwargs.get("eps", _OPENCLIP_EPS))


def _same(values: dict[str, Any], field: str) -> Any:
    """The one value both towers give `field`; ConfigError if they differ (bigmodel has one for both)."""
    vision, text = values["vision_cfg"], values["text_cfg"]
    if vision != text:
        raise ConfigError(
            f"vision_cfg {field} {vision} differs from text_cfg {field} {text}; bigmodel uses one value for both towers"
        )
    return vision


def _mlp_dim(width: int, ratio: float) -> int:
    return int(width * ratio)  # as OpenCLIP's ResidualAttentionBlock sizes its MLP


def model_config_from_openclip(model_cfg: Mapping[str, Any]) -> ModelConfig:
    """The ModelConfig (fusion none, causal text) of the dual encoder computing what OpenCLIP's `CLIP(**model_cfg)`
    computes. ConfigError (one line, naming the field) for what bigmodel cannot express."""
    _check_fields(model_cfg, "")
    towers = {}
    for section in ("vision_cfg", "text_cfg"):
        tower = model_cfg.get(section)
        if not isinstance(tower, Mapping) or "embed_dim" not in model_cfg:
            raise ConfigError("not an OpenCLIP model config: it needs embed_dim, vision_cfg and text_cfg")
        _check_fields(tower, section)
        towers[section] = {**_DEFAULTS[section], **tower}
    vision, text = towers["vision_cfg"], towers["text_cfg"]
    if not isinstance(vision["layers"], int):
        raise ConfigError(f"vision_cfg.layers={vision['layers']}: a list is a ResNet tower; only a ViT converts")
    for field in ("image_size", "patch_size"):
        if not isinstance(vision[field], int):
            raise ConfigError(f"vision_cfg.{field}={vision[field]}: only a square side given as one int converts")
    if vision["width"] % vision["head_width"]:
        raise ConfigError(f"vision_cfg.head_width={vision['head_width']} does not divide width={vision['width']}")
    quick_gelu = bool(model_cfg.get("quick_gelu", False))
    activation = _same({s: _tower_activation(t, s, quick_gelu) for s, t in towers.items()}, "activation")
    norm_eps = _same({s: _tower_eps(t, s) for s, t in towers.items()}, "norm_kwargs.eps")
    return ModelConfig(
        image_size=vision["image_size"],
        patch_size=vision["patch_size"],
        channels=3,  # OpenCLIP's ViT takes RGB images only
        vision_width=vision["width"],
        vision_layers=vision["layers"],
        vision_heads=vision["width"] // vision["head_width"],
        vision_mlp_dim=_mlp_dim(vision["width"], vision["mlp_ratio"]),
        vocab_size=text["vocab_size"],
        context_length=text["context_length"],
        text_width=text["width"],
        text_layers=text["layers"],
        text_heads=text["heads"],
        text_mlp_dim=_mlp_dim(text["width"], text["mlp_ratio"]),
        text_causal=True,
        embed_dim=model_cfg["embed_dim"],
        fusion="none",
        fusion_layers=0,
        activation=activation,
        dropout=0.0,
        norm_eps=norm_eps,
        logit_scale_init=float(model_cfg.get("init_logit_scale", _DEFAULT_LOGIT_SCALE)),
        patch_dropout=float(vision.get("patch_dropout", 0.0)),
    )


def _mlp_ratio(width: int, mlp_dim: int, field: str) -> float:
    ratio = mlp_dim / width
    if _mlp_dim(width, ratio) != mlp_dim:
        raise ConfigError(f"model.{field}={mlp_dim}: OpenCLIP sizes the MLP as int(width * mlp_ratio), not this value")
    return ratio


def openclip_config_from_model_config(cfg: ModelConfig, tokenizer: CaptionTokenizer) -> dict[str, Any]:
    """The OpenCLIP model config (the dict of open_clip's model_configs/*.json) of the CLIP computing what
    MultimodalEncoder(cfg, ("contrastive",)) computes with `tokenizer`'s captions. Text pools at argmax(ids) (OpenCLIP's
    default) when the end-of-text id is the tokenizer's highest, else at the first end-of-text id. ConfigError (one
    line) for what OpenCLIP cannot express: fusion, bidirectional text, dropout, other than 3 channels."""
    if cfg.fusion != "none":
        raise ConfigError(
            f"model.fusion={cfg.fusion}: OpenCLIP's CLIP is a dual encoder; only model.fusion=none converts"
        )
    if not cfg.text_causal:
        raise ConfigError("model.text_causal=false: OpenCLIP's text tower is causal; only text_causal=true converts")
    if cfg.dropout > 0:
        raise ConfigError(f"model.dropout={cfg.dropout}: OpenCLIP's CLIP has no residual dropout; set model.dropout=0")
    if cfg.channels != 3:
        raise ConfigError(f"model.channels={cfg.channels}: OpenCLIP's ViT takes RGB images; only channels=3 converts")
    norm = {} if cfg.norm_eps == _OPENCLIP_EPS else {"norm_kwargs": {"eps": cfg.norm_eps}}
    act = {"act_kwargs": {"approximate": "tanh"}} if cfg.activation == "gelu_tanh" else {}
    pooling = {"pool_type": "argmax"}
    if tokenizer.eos_id != tokenizer.vocab_size - 1:
        pooling = {"pool_type": "eos", "eos_id": tokenizer.eos_id}
    vision = {
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "width": cfg.vision_width,
        "layers": cfg.vision_layers,
        "head_width": cfg.vision_width // cfg.vision_heads,
        "mlp_ratio": _mlp_ratio(cfg.vision_width, cfg.vision_mlp_dim, "vision_mlp_dim"),
        **norm,
        **act,
    }
    if cfg.patch_dropout > 0:  # training only in both: OpenCLIP's PatchDropout keeps the class token and K patches
        vision["patch_dropout"] = cfg.patch_dropout
    text = {
        "context_length": cfg.context_length,
        "vocab_size": cfg.vocab_size,
        "width": cfg.text_width,
        "heads": cfg.text_heads,
        "layers": cfg.text_layers,
        "mlp_ratio": _mlp_ratio(cfg.text_width, cfg.text_mlp_dim, "text_mlp_dim"),
        **pooling,
        **norm,
        **act,
    }
    return {
        "embed_dim": cfg.embed_dim,
        "quick_gelu": cfg.activation == "quick_gelu",
        "init_logit_scale": cfg.logit_scale_init,
        "vision_cfg": vision,
        "text_cfg": text,
    }


Layout = Literal["same", "transpose", "fused_qkv", "scalar"]
"""How one OpenCLIP tensor is made from its bigmodel tensors: as it is, transposed, q/k/v concatenated along dim 0,
or a (1,) tensor as a scalar."""

_BLOCK = {  # OpenCLIP's ResidualAttentionBlock tensor -> bigmodel Block tensor
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def tensor_map(cfg: ModelConfig) -> dict[str, tuple[Layout, tuple[str, ...]]]:
    """Every tensor of OpenCLIP's CLIP for model `cfg`: its layout and the bigmodel tensors it is made of."""
    mapping: dict[str, tuple[Layout, tuple[str, ...]]] = {
        "visual.conv1.weight": ("same", ("vision.patch_embedding.weight",)),
        "visual.class_embedding": ("same", ("vision.class_embedding",)),
        "visual.positional_embedding": ("same", ("vision.position_embedding",)),
        "visual.proj": ("transpose", ("contrastive.visual_projection.weight",)),
        "token_embedding.weight": ("same", ("text.token_embedding.weight",)),
        "positional_embedding": ("same", ("text.position_embedding",)),
        "text_projection": ("transpose", ("contrastive.text_projection.weight",)),
        "logit_scale": ("scalar", ("contrastive.logit_scale",)),
    }
    # Tensors with a weight and a bias that are only renamed: the LayerNorms, and inside blocks also the Linears.
    renamed = {"visual.ln_pre": "vision.pre_norm", "visual.ln_post": "vision.post_norm", "ln_final": "text.final_norm"}
    towers = (("visual.transformer", "vision", cfg.vision_layers), ("transformer", "text", cfg.text_layers))
    for theirs, ours, layers in towers:
        for layer in range(layers):
            block, into = f"{theirs}.resblocks.{layer}", f"{ours}.blocks.layers.{layer}"
            renamed |= {f"{block}.{name}": f"{into}.{mine}" for name, mine in _BLOCK.items()}
            for kind in ("weight", "bias"):
                qkv = tuple(f"{into}.self_attn.{p}_proj.{kind}" for p in "qkv")
                mapping[f"{block}.attn.in_proj_{kind}"] = ("fused_qkv", qkv)
    for theirs, ours in renamed.items():
        for kind in ("weight", "bias"):
            mapping[f"{theirs}.{kind}"] = ("same", (f"{ours}.{kind}",))
    return mapping


def openclip_shape(layout: Layout, shapes: list[torch.Size]) -> tuple[int, ...]:
    """The OpenCLIP shape of a tensor of `layout` made of bigmodel tensors of `shapes`."""
    if layout == "transpose":
        return tuple(reversed(shapes[0]))
    if layout == "fused_qkv":
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    if layout == "scalar":
        return ()
    return tuple(shapes[0])


def to_openclip(layout: Layout, tensors: list[torch.Tensor]) -> torch.Tensor:
    """The OpenCLIP tensor of `layout` made of its bigmodel `tensors` (in tensor_map's order)."""
    if layout == "transpose":
        return tensors[0].t().contiguous()
    if layout == "fused_qkv":
        return torch.cat(tensors)
    if layout == "scalar":
        return tensors[0].reshape(())
    return tensors[0]


def from_openclip(layout: Layout, tensor: torch.Tensor, count: int) -> list[torch.Tensor]:
    """The `count` bigmodel tensors (in tensor_map's order) that the OpenCLIP `tensor` of `layout` holds."""
    if layout == "transpose":
        return [tensor.t().contiguous()]
    if layout == "fused_qkv":
        return list(tensor.chunk(count))
    if layout == "scalar":
        return [tensor.reshape(1)]
    return [tensor]


def _bigmodel_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """bigmodel's tensor shapes for `cfg` (fusion none, contrastive only), from a model on the meta device."""
    from bigmodel.models.encoder import MultimodalEncoder

    with torch.device("meta"):
        return {name: t.shape for name, t in MultimodalEncoder(cfg, ("contrastive",)).state_dict().items()}


def bigmodel_state_dict(cfg: ModelConfig, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP `weights` (CLIP's state dict) as bigmodel tensors for model `cfg`. ValueError (one line) naming the
    first tensor that is missing, unknown or of another shape than the config needs."""
    shapes = _bigmodel_shapes(cfg)
    mapping = tensor_map(cfg)
    unknown = sorted(set(weights) - set(mapping))
    if unknown:
        raise ValueError(f"weights tensor {unknown[0]} has no place in the model the config describes")
    converted = {}
    for name, (layout, ours) in sorted(mapping.items()):
        if name not in weights:
            raise ValueError(f"weights lack tensor {name}, which the config's model needs")
        expected = openclip_shape(layout, [shapes[n] for n in ours])
        tensor = weights[name]
        if tuple(tensor.shape) != expected and not (layout == "scalar" and tensor.numel() == 1):
            raise ValueError(f"weights tensor {name} has shape {tuple(tensor.shape)}, the config needs {expected}")
        converted |= dict(zip(ours, from_openclip(layout, tensor, len(ours)), strict=True))
    return converted


def read_openclip_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict saved by OpenCLIP: .safetensors, or torch.save (weights_only, never unpickling code) of the
    state dict itself or of a training checkpoint {"state_dict": ...}; DDP's "module." prefix is dropped."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        weights = load_file(path)
    else:
        try:
            weights = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(
                f"{path} holds more than tensors (torch.load with weights_only refused it); bigmodel never unpickles "
                "code: save the state dict alone, or as .safetensors"
            ) from None
    if isinstance(weights, Mapping) and isinstance(weights.get("state_dict"), Mapping):
        weights = weights["state_dict"]
    if not isinstance(weights, Mapping) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise ValueError(f"{path} holds no state dict of tensors")
    return {name.removeprefix("module."): tensor for name, tensor in weights.items()}


def read_model_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model config, preprocess config) from an OpenCLIP JSON: a bare model config (open_clip/model_configs/*.json)
    or the {"model_cfg", "preprocess_cfg"} layout of an open_clip_config.json."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    if "model_cfg" in raw:
        return raw["model_cfg"], raw.get("preprocess_cfg", {})
    return raw, {}


def _data_fields(preprocess: Mapping[str, Any]) -> dict[str, Any]:
    """The data fields of the imported run: data.transform clip (OpenCLIP's evaluation resize, crop and
    normalisation) with the preprocess config's mean and std."""
    for field, value in (("resize_mode", "shortest"), ("interpolation", "bicubic"), ("mode", "RGB")):
        if preprocess.get(field, value) != value:
            raise ConfigError(
                f"preprocess_cfg.{field}={preprocess[field]}: bigmodel's data.transform clip does {value} only"
            )
    return {
        "transform": "clip",
        "image_mean": list(preprocess.get("mean", _OPENAI_MEAN)),
        "image_std": list(preprocess.get("std", _OPENAI_STD)),
    }


def _checked_tokenizer(spec: str, model_cfg: Mapping[str, Any], vocab_size: int) -> CaptionTokenizer:
    """The tokenizer `spec`, after checking its ids fit the model and it ends captions where OpenCLIP pools."""
    tokenizer = load_tokenizer(spec)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"tokenizer {spec} has {tokenizer.vocab_size} ids but the model only {vocab_size}")
    text = model_cfg["text_cfg"]
    if text.get("pool_type", "argmax") == "eos" and text.get("eos_id", 2) != tokenizer.eos_id:
        raise ValueError(
            f"text_cfg.eos_id={text.get('eos_id', 2)} but tokenizer {spec} ends captions with id {tokenizer.eos_id}; "
            "import with the model's own tokenizer (--tokenizer)"
        )
    if text.get("pool_type", "argmax") == "argmax" and tokenizer.eos_id != tokenizer.vocab_size - 1:
        raise ValueError(
            f"OpenCLIP pools text at the highest id (pool_type argmax) but tokenizer {spec}'s end-of-text id "
            f"{tokenizer.eos_id} is not its highest; import with the model's own tokenizer (--tokenizer)"
        )
    return tokenizer


def import_openclip(
    config_file: str | Path, weights_file: str | Path, out: str | Path, tokenizer: str = "builtin"
) -> Path:
    """Turn an OpenCLIP model config JSON and its weights into the bigmodel run directory `out` (config.yaml, the
    tokenizer in out/tokenizer, a step-0 checkpoint that `bigmodel eval OUT` evaluates and
    `--checkpoint.resume=OUT` continues). Returns the checkpoint.

    `tokenizer` is a data.tokenizer value (OpenAI CLIP's tokenizer.json, or its vocab.json + merges.txt folder);
    data.transform is clip with the preprocess config's mean and std (OpenAI's by default). ConfigError / ValueError
    (one line) for a config bigmodel cannot express, weights that do not match it, a tokenizer that ends captions
    elsewhere than the model pools, or an `out` that is not empty.
    """
    from bigmodel.hf.convert import save_imported_run

    config_file, weights_file, out = Path(config_file), Path(weights_file), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; import into a new directory")
    model_cfg, preprocess = read_model_config(config_file)
    model = model_config_from_openclip(model_cfg)
    data = _data_fields(preprocess)
    kept = _checked_tokenizer(tokenizer, model_cfg, model.vocab_size)
    state_dict = bigmodel_state_dict(model, read_openclip_weights(weights_file))
    return save_imported_run(model, state_dict, kept, out, str(weights_file.absolute()), data)


def _preprocess_config(saved: Mapping[str, Any], image_size: int) -> dict[str, Any]:
    """open_clip's preprocess config for the run's evaluation images (data.transform clip or shapes)."""
    data = saved["data"]
    if data.get("transform", "shapes") == "clip":
        mean, std, resize = data["image_mean"], data["image_std"], "shortest"
    else:  # shapes: resize to the model's square without a crop, scaled to [-1, 1]
        mean, std, resize = [0.5] * 3, [0.5] * 3, "squash"
    return {"size": image_size, "mean": mean, "std": std, "interpolation": "bicubic", "resize_mode": resize}


def _read_openclip(tensors: ModelTensors, layout: Layout, ours: tuple[str, ...]) -> torch.Tensor:
    return to_openclip(layout, [tensors.read(name) for name in ours])


def _entry(name: str, layout: Layout, ours: tuple[str, ...], tensors: ModelTensors) -> SafetensorsEntry:
    """The OpenCLIP tensor `name`, read from its bigmodel tensors when it is written."""
    shape = openclip_shape(layout, [tensors.shapes[n].size for n in ours])
    dtype = tensors.shapes[ours[0]].properties.dtype
    return SafetensorsEntry(name, dtype, shape, partial(_read_openclip, tensors, layout, ours))


def export_openclip(path: str | Path, out_dir: str | Path, progress: bool = False) -> Path:
    """An OpenCLIP folder at `out_dir` computing what the checkpoint's model computes, written tensor by tensor:
    open_clip_config.json ({"model_cfg", "preprocess_cfg"}), open_clip_model.safetensors, the bare model config
    open_clip_model.json and the run's tokenizer (tokenizer.json). `open_clip.create_model_and_transforms(
    "local-dir:" + out_dir)` loads it. open_clip tokenizes with OpenAI CLIP's BPE (its default): that equals the
    run's when the run used CLIP's tokenizer; otherwise tokenize with the exported tokenizer.json.

    Only fusion none with the contrastive objective converts; ConfigError / ValueError (one line) otherwise.
    """
    from bigmodel.config.load import config_from_dict
    from bigmodel.hf.processing import save_tokenizer

    path, out_dir = resolve_checkpoint(path), Path(out_dir)
    verify_manifest(path)
    saved = saved_config(path)
    objectives = [name for name, weight in saved["train"]["loss_weights"].items() if weight > 0]
    if objectives != ["contrastive"]:
        raise ConfigError(f"train.loss_weights: objectives {objectives}; OpenCLIP's CLIP has the contrastive head only")
    cfg = config_from_dict(saved)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model_cfg = openclip_config_from_model_config(cfg.model, tokenizer)
    tensors = ModelTensors(path)
    mapping = tensor_map(cfg.model)
    used = {name for _, ours in mapping.values() for name in ours}
    if set(tensors.shapes) != used:
        odd = sorted(set(tensors.shapes) ^ used)[0]
        raise ValueError(f"checkpoint {path}: tensor {odd} does not fit the OpenCLIP model its config describes")
    entries = [_entry(name, layout, ours, tensors) for name, (layout, ours) in sorted(mapping.items())]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(out_dir / WEIGHTS_FILE, entries, {"format": "pt"}, progress)
    folder = {"model_cfg": model_cfg, "preprocess_cfg": _preprocess_config(saved, cfg.model.image_size)}
    (out_dir / CONFIG_FILE).write_text(json.dumps(folder, indent=2) + "\n", encoding="utf-8")
    (out_dir / MODEL_CONFIG_FILE).write_text(json.dumps(model_cfg, indent=2) + "\n", encoding="utf-8")
    save_tokenizer(tokenizer, out_dir, cfg.model.context_length)
    return out_dir
