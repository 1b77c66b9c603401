"""bigmodel's dual encoder against transformers' CLIPModel: the same weights give the same embeddings and logits."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")  # the optional `hf` extra

from transformers import CLIPConfig, CLIPModel

from bigmodel.config.schema import ModelConfig
from bigmodel.hf.clip import (
    bigmodel_to_clip_state_dict,
    clip_config_from_model_config,
    clip_to_bigmodel_state_dict,
    model_config_from_clip_config,
)
from bigmodel.models import MultimodalEncoder, build_model

BOS, EOS, PAD = 3, 4, 0
VOCAB, CONTEXT = 100, 16
LENGTHS = (16, 9, 5, 12)  # real tokens per caption; all but the first are right-padded

# Both sides compute in fp32 and differ only in reduction order (eager or fused attention, a boolean mask or an
# additive -inf one, the logit scale applied before or after the matmul): a few float32 ulps (~1e-7 relative) per
# op on unit-norm embeddings (measured: <= 1.5e-7), and <= 2e-6 on logits of magnitude ~4 (logit scale ~14). 1e-5
# leaves a wide margin, while a misplaced tensor or a wrongly pooled token moves the outputs by more than 1e-2.
TOL = 1e-5


def small_clip_config(text: dict | None = None, vision: dict | None = None) -> CLIPConfig:
    """A tiny CLIPConfig; the towers differ in width and head count so a tensor put in the wrong tower fails."""
    text_config = {
        "vocab_size": VOCAB,
        "max_position_embeddings": CONTEXT,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "hidden_act": "quick_gelu",
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        **(text or {}),
    }
    vision_config = {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "hidden_act": "quick_gelu",
        **(vision or {}),
    }
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=24)


def small_model_config(**changes) -> ModelConfig:
    """The bigmodel counterpart of `small_clip_config()`."""
    fields = {
        "vision_width": 48,
        "vision_heads": 4,
        "vision_mlp_dim": 96,
        "vocab_size": VOCAB,
        "context_length": CONTEXT,
        "text_width": 32,
        "text_heads": 2,
        "text_mlp_dim": 64,
        "text_causal": True,
        "embed_dim": 24,
        "fusion": "none",
        "fusion_layers": 0,
        "activation": "quick_gelu",
    }
    return ModelConfig(**{**fields, **changes})


@torch.no_grad()
def perturb(module: torch.nn.Module, seed: int) -> None:
    """Add noise to every parameter: at their initial 0 (biases) and 1 (LayerNorm scales) a swapped pair of biases
    or norms would compute the same thing and a wrong mapping could pass."""
    gen = torch.Generator().manual_seed(seed)
    for param in module.parameters():
        param.add_(torch.randn(param.shape, generator=gen) * 0.05)


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Images and right-padded captions: BOS, ordinary tokens (never EOS), EOS at the last real token, then PAD."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((len(LENGTHS), CONTEXT), PAD)
    mask = torch.zeros(len(LENGTHS), CONTEXT, dtype=torch.long)
    for row, length in enumerate(LENGTHS):
        ids[row, 0] = BOS
        ids[row, 1 : length - 1] = torch.randint(EOS + 1, VOCAB, (length - 2,), generator=gen)
        ids[row, length - 1] = EOS
        mask[row, :length] = 1
    pixels = torch.randn(len(LENGTHS), 3, 32, 32, generator=gen)
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def clip_outputs(clip: CLIPModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """image_embeds, text_embeds (unit-norm) and logits_per_image of CLIPModel."""
    out = clip.eval()(**batch)
    return {"image_embeds": out.image_embeds, "text_embeds": out.text_embeds, "logits": out.logits_per_image}


@torch.no_grad()
def bigmodel_outputs(model: MultimodalEncoder, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same three outputs from MultimodalEncoder."""
    out = model.eval()(batch)
    logits = out["logit_scale"] * out["image_embeds"] @ out["text_embeds"].t()
    return {"image_embeds": out["image_embeds"], "text_embeds": out["text_embeds"], "logits": logits}


def assert_same_outputs(clip: CLIPModel, model: MultimodalEncoder) -> None:
    batch = make_batch()
    ours, theirs = bigmodel_outputs(model, batch), clip_outputs(clip, batch)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_clip_weights_in_bigmodel_give_clip_outputs(attn_implementation: str) -> None:
    # Both of transformers' attention paths combine the padding mask with the causal mask in their own way.
    torch.manual_seed(0)
    clip = CLIPModel._from_config(small_clip_config(), attn_implementation=attn_implementation)
    perturb(clip, seed=1)
    model = build_model(model_config_from_clip_config(clip.config), ("contrastive",))
    model.load_state_dict(clip_to_bigmodel_state_dict(clip.state_dict()))
    assert_same_outputs(clip, model)


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu", "gelu_tanh"])
def test_bigmodel_weights_in_clip_give_bigmodel_outputs(activation: str) -> None:
    cfg = small_model_config(activation=activation)
    model = build_model(cfg, ("contrastive",), seed=0)
    perturb(model, seed=2)
    clip = CLIPModel(clip_config_from_model_config(cfg, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=BOS))
    clip.load_state_dict(bigmodel_to_clip_state_dict(model.state_dict()))
    assert_same_outputs(clip, model)


def test_converted_model_survives_save_pretrained(tmp_path) -> None:
    cfg = small_model_config()
    model = build_model(cfg, ("contrastive",), seed=3)
    perturb(model, seed=4)
    clip = CLIPModel(clip_config_from_model_config(cfg))
    clip.load_state_dict(bigmodel_to_clip_state_dict(model.state_dict()))
    clip.save_pretrained(tmp_path)
    reloaded = CLIPModel.from_pretrained(tmp_path)
    for name, tensor in clip.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=0)  # safetensors is lossless
    assert reloaded.config.text_config.eos_token_id == EOS
    assert_same_outputs(reloaded, model)


def test_config_round_trip() -> None:
    cfg = small_model_config(init_std=0.03, logit_scale_init=2.0, norm_eps=1e-6, channels=1, patch_size=4)
    assert model_config_from_clip_config(clip_config_from_model_config(cfg)) == cfg


def test_state_dict_round_trip_drops_clip_buffers() -> None:
    with torch.device("meta"):  # names and shapes are all that matter here
        model = MultimodalEncoder(small_model_config(), ("contrastive",))
    ours = model.state_dict()
    clip_state = bigmodel_to_clip_state_dict(ours)
    clip_state["text_model.embeddings.position_ids"] = torch.arange(CONTEXT)[None]
    back = clip_to_bigmodel_state_dict(clip_state)
    assert back.keys() == ours.keys()
    # Renaming passes tensors through uncopied; only the logit scale is reshaped (CLIP's is a scalar, ours (1,)).
    assert all(back[name] is tensor for name, tensor in ours.items() if name != "contrastive.logit_scale")
    assert clip_state["logit_scale"].shape == () and back["contrastive.logit_scale"].shape == (1,)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"fusion": "cross", "fusion_layers": 1}, "model.fusion"),
        ({"text_causal": False}, "model.text_causal"),
        ({"dropout": 0.1}, "model.dropout"),
    ],
)
def test_unrepresentable_model_config_is_refused(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}=[^\n]*$"):
        clip_config_from_model_config(small_model_config(**changes))


@pytest.mark.parametrize("eos_token_id", [2, VOCAB])
def test_unusable_eos_token_is_refused(eos_token_id: int) -> None:
    with pytest.raises(ValueError, match=rf"^eos_token_id={eos_token_id}[^\n]*$"):
        clip_config_from_model_config(small_model_config(), eos_token_id=eos_token_id)


@pytest.mark.parametrize(
    ("text", "vision", "message"),
    [
        ({"hidden_act": "gelu"}, {}, "hidden_act=gelu differs"),
        ({"hidden_act": "gelu_new"}, {"hidden_act": "gelu_new"}, "hidden_act=gelu_new is not supported"),
        ({"layer_norm_eps": 1e-6}, {}, "layer_norm_eps=1e-06 differs"),
        ({"attention_dropout": 0.1}, {"attention_dropout": 0.1}, "attention_dropout > 0"),
        ({}, {"image_size": [32, 48]}, r"image_size=\[32, 48\] is not square"),
    ],
)
def test_unrepresentable_clip_config_is_refused(text: dict, vision: dict, message: str) -> None:
    with pytest.raises(ValueError, match=rf"{message}[^\n]*$"):
        model_config_from_clip_config(small_clip_config(text, vision))


def test_tensor_clip_lacks_is_named() -> None:
    cfg = small_model_config(fusion="cross", fusion_layers=1, text_causal=False)
    with torch.device("meta"):
        state = MultimodalEncoder(cfg, ("contrastive", "itm")).state_dict()
    with pytest.raises(ValueError, match=r"^bigmodel tensor 'fusion\.[^\n]*$"):
        bigmodel_to_clip_state_dict(state)


def test_missing_tensors_are_named() -> None:
    with torch.device("meta"):
        ours = MultimodalEncoder(small_model_config(), ("contrastive",)).state_dict()
    clip_state = bigmodel_to_clip_state_dict(ours)
    del ours["text.final_norm.bias"]
    with pytest.raises(ValueError, match=r"^bigmodel state dict lacks 'text\.final_norm\.bias'[^\n]*$"):
        bigmodel_to_clip_state_dict(ours)
    del clip_state["vision_model.encoder.layers.0.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"^CLIP state dict lacks 'vision_model\.encoder\.layers\.0\.mlp\.fc2\.bias'"):
        clip_to_bigmodel_state_dict(clip_state)


def test_unknown_clip_tensor_is_named() -> None:
    with torch.device("meta"):
        clip_state = bigmodel_to_clip_state_dict(MultimodalEncoder(small_model_config(), ("contrastive",)).state_dict())
    clip_state["text_model.encoder.layers.0.self_attn.rotary.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"^CLIPModel tensor 'text_model\.encoder\.layers\.0\.self_attn\.rotary"):
        clip_to_bigmodel_state_dict(clip_state)
