"""The OpenCLIP bridge against the real open_clip_torch: `bigmodel ckpt import-openclip` and `export-openclip`.

Small ViT-B-16-like models with random (perturbed) weights in the two styles open_clip ships: OpenAI's (quick_gelu)
and LAION's (nn.GELU). References: open_clip's own model, tokenizer (OpenAI CLIP's BPE) and evaluation transform
on scikit-learn's two sample photos, and transformers' CLIPModel for the export-hf leg.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("open_clip")  # a test extra; imports through the venv's torchvision start-up hook
pytest.importorskip("transformers")  # the optional `hf` extra

import open_clip
import transformers
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_sample_images

from bigmodel.checkpoint.run import resolve_checkpoint
from bigmodel.checkpoint.sharded import load_sharded
from bigmodel.cli import main as cli_main
from bigmodel.config import ConfigError, load_config
from bigmodel.config.load import config_from_dict
from bigmodel.config.schema import ParallelConfig
from bigmodel.data import ShapesSource, build_eval_loader, load_tokenizer
from bigmodel.data.transforms import build_transform
from bigmodel.engines.native import NativeEngine
from bigmodel.hf.convert import export_hf
from bigmodel.hf.openclip import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    bigmodel_state_dict,
    import_openclip,
    model_config_from_openclip,
    openclip_config_from_model_config,
)
from bigmodel.models.encoder import MultimodalEncoder
from bigmodel.parallel.context import setup_parallel
from bigmodel.train.loop import train

ROOT = Path(__file__).resolve().parents[2]
CAPTIONS = [
    "a photo of a temple",
    "a flower in close-up",
    "two dogs playing in the snow!",
    "a long caption: " + "the quick brown fox jumps over the lazy dog " * 12,  # truncated at 77 tokens
]
# Same weights in fp32 through different kernels (nn.MultiheadAttention with a float causal mask against SDPA with a
# boolean one, fused against separate q/k/v matmuls): a few ulps (measured: embeddings 1.3e-7, logits of scale 1/0.07
# 9.5e-7). The wrong activation (quick_gelu for gelu) moves embeddings by 3.2e-3 and q, k swapped by 0.23.
TOL = 1e-5
STYLES = {"openai": True, "laion": False}  # quick_gelu


def small_config(quick_gelu: bool) -> dict:
    """ViT-B-16's layout at small widths: patch 8 on 32-pixel images, 2 layers and 2 heads per tower, CLIP's
    vocabulary and context."""
    return {
        "embed_dim": 32,
        "quick_gelu": quick_gelu,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


@pytest.fixture(scope="module", params=list(STYLES))
def source(request, tmp_path_factory) -> dict:
    """An OpenCLIP model of one style built by create_model_and_transforms from its config JSON, every tensor but
    logit_scale perturbed (LayerNorms start at ones and zeros, which would hide swapped weights and biases), its
    weights saved (torch.save for OpenAI's style, safetensors for LAION's), with its tokenizer and transform."""
    folder = tmp_path_factory.mktemp(f"openclip-{request.param}")
    name = f"bigmodel-test-{request.param}"
    config_file = folder / f"{name}.json"
    config_file.write_text(json.dumps(small_config(STYLES[request.param])))
    open_clip.add_model_config(config_file)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    with torch.no_grad():
        for tensor_name, tensor in model.state_dict().items():
            if tensor_name != "logit_scale":
                tensor.add_(torch.randn_like(tensor) * 0.05)
    if request.param == "openai":
        weights = folder / "weights.pt"
        torch.save(model.state_dict(), weights)
    else:
        weights = folder / "open_clip_model.safetensors"
        save_file(model.state_dict(), weights)
    return {
        "name": name,
        "quick_gelu": STYLES[request.param],
        "config": config_file,
        "weights": weights,
        "model": model.eval(),
        "preprocess": preprocess,
        "tokenizer": open_clip.get_tokenizer(name),
    }


@pytest.fixture(scope="module")
def imported(source, clip_tokenizer_dir, tmp_path_factory) -> Path:
    """The source imported through the CLI, with CLIP's tokenizer."""
    out = tmp_path_factory.mktemp("imported") / "run"
    args = [str(source["config"]), str(source["weights"]), str(out), "--tokenizer", str(clip_tokenizer_dir)]
    assert cli_main.main(["ckpt", "import-openclip", *args]) == 0
    return out


def photos() -> list[Image.Image]:
    return [Image.fromarray(image) for image in load_sample_images().images]


def pixels(preprocess) -> torch.Tensor:
    """The two photos through an open_clip transform, cycled to one image per caption: (len(CAPTIONS), 3, 32, 32)."""
    images = torch.stack([preprocess(photo) for photo in photos()])
    return images[torch.arange(len(CAPTIONS)) % len(images)]


@torch.no_grad()
def openclip_outputs(model, preprocess, tokenizer) -> dict[str, torch.Tensor]:
    images, texts = model.encode_image(pixels(preprocess), normalize=True), model.encode_text(tokenizer(CAPTIONS), True)
    return {"image": images, "text": texts, "logits": model.logit_scale.exp() * images @ texts.T}


@torch.no_grad()
def bigmodel_outputs(run: Path, images: torch.Tensor, openclip_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The run's model, loaded as the engine loads it, on `images` and the captions as its own tokenizer encodes
    them; the ids are checked against open_clip's on every real position first."""
    checkpoint = resolve_checkpoint(run)
    saved = json.loads((checkpoint / "manifest.json").read_text())["extra"]["config"]
    cfg = dataclasses.replace(config_from_dict(saved), parallel=ParallelConfig())
    engine = NativeEngine(cfg, setup_parallel(cfg))
    load_sharded(checkpoint, engine)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    encoded = [tokenizer.encode(caption, cfg.model.context_length) for caption in CAPTIONS]
    ids, mask = (torch.tensor([row[i] for row in encoded]) for i in (0, 1))
    # open_clip pads with 0 and bigmodel with end-of-text; every real token (through end-of-text) must agree.
    assert torch.equal(mask.sum(1), openclip_ids.argmax(1) + 1)
    assert torch.equal(ids * mask, openclip_ids * mask)
    out = engine.model.eval()({"pixel_values": images, "input_ids": ids, "attention_mask": mask})
    image, text = out["image_embeds"], out["text_embeds"]
    return {"image": image, "text": text, "logits": out["logit_scale"][0] * image @ text.T}


def assert_outputs_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for key in ("image", "text", "logits"):
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=TOL, msg=key)


def test_import_gives_openclips_embeddings_and_logits(source, imported) -> None:
    expected = openclip_outputs(source["model"], source["preprocess"], source["tokenizer"])
    ids = source["tokenizer"](CAPTIONS)
    assert_outputs_close(bigmodel_outputs(imported, pixels(source["preprocess"]), ids), expected)
    cfg = load_config(imported / "config.yaml")
    assert cfg.model.activation == ("quick_gelu" if source["quick_gelu"] else "gelu")
    # The run's own evaluation transform prepares the photos as open_clip's does (float32 rounding apart).
    transform = build_transform(cfg, train=False)
    ours = np.stack([transform(np.asarray(photo), np.random.default_rng(0)) for photo in photos()])
    theirs = np.stack([source["preprocess"](photo).numpy() for photo in photos()])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_import_reads_open_clips_training_checkpoint_of_a_tanh_gelu_model(clip_tokenizer_dir, tmp_path) -> None:
    """open_clip_train saves {"epoch", "name", "state_dict", "optimizer"} with DDP's "module." prefix; the tanh
    approximation of GELU (act_kwargs) becomes model.activation gelu_tanh."""
    config = small_config(quick_gelu=False)
    for tower in ("vision_cfg", "text_cfg"):
        config[tower]["act_kwargs"] = {"approximate": "tanh"}
    torch.manual_seed(0)
    model = open_clip.CLIP(**config).eval()
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.add_(torch.randn_like(tensor) * 0.05)
    state = {f"module.{name}": tensor for name, tensor in model.state_dict().items()}
    torch.save(
        {"epoch": 3, "name": "tanh", "state_dict": state, "optimizer": {"step": torch.tensor(9)}}, tmp_path / "e.pt"
    )
    (tmp_path / "tanh.json").write_text(json.dumps(config))
    import_openclip(tmp_path / "tanh.json", tmp_path / "e.pt", tmp_path / "run", str(clip_tokenizer_dir))
    assert load_config(tmp_path / "run" / "config.yaml").model.activation == "gelu_tanh"
    preprocess, tokenizer = open_clip.image_transform(32, is_train=False), open_clip.get_tokenizer("ViT-B-16")
    expected = openclip_outputs(model, preprocess, tokenizer)
    assert_outputs_close(bigmodel_outputs(tmp_path / "run", pixels(preprocess), tokenizer(CAPTIONS)), expected)


def test_export_loads_in_open_clip_unchanged_and_round_trips_exactly(source, imported, tmp_path) -> None:
    out = tmp_path / "exported"
    assert cli_main.main(["ckpt", "export-openclip", str(imported), str(out)]) == 0
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    original = source["model"].state_dict()
    exported = model.state_dict()
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name  # a pure relayout: bit for bit
    images = pixels(preprocess)
    assert torch.equal(images, pixels(source["preprocess"]))  # the same resize, crop and normalisation
    ids = tokenizer(CAPTIONS)
    assert torch.equal(ids, source["tokenizer"](CAPTIONS))
    assert_outputs_close(openclip_outputs(model.eval(), preprocess, tokenizer), bigmodel_outputs(imported, images, ids))
    # The bare model config beside the weights works with pretrained=FILE, as CLIP_benchmark passes it.
    open_clip.add_model_config(out / "open_clip_model.json")
    again, _, _ = open_clip.create_model_and_transforms("open_clip_model", pretrained=str(out / WEIGHTS_FILE))
    assert all(torch.equal(again.state_dict()[name], tensor) for name, tensor in original.items())
    assert json.loads((out / CONFIG_FILE).read_text())["model_cfg"]["quick_gelu"] == source["quick_gelu"]


def test_a_run_trained_here_exports_with_its_own_tokenizer_ids_and_preprocessing(tmp_path) -> None:
    """configs/tiny-clip.yaml after one step: builtin tokenizer (end-of-text id 4, not its highest, so the export
    pools at pool_type eos) and the shapes transform (a squash resize, mean = std = 0.5)."""
    overrides = ["--train.steps=1", "--train.warmup_steps=0", "--log.progress=false", "--log.wandb=disabled"]
    overrides += ["--data.eval_size=8", f"--train.out_dir={tmp_path / 'run'}"]
    run = train(load_config(ROOT / "configs" / "tiny-clip.yaml", overrides)).checkpoint
    assert cli_main.main(["ckpt", "export-openclip", str(run), str(tmp_path / "oc")]) == 0
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    cfg = dataclasses.replace(load_config(tmp_path / "run" / "config.yaml"), parallel=ParallelConfig())
    engine = NativeEngine(cfg, setup_parallel(cfg))
    load_sharded(resolve_checkpoint(run), engine)
    batch = next(iter(build_eval_loader(cfg, 8)))
    images = [Image.fromarray(ShapesSource("eval", 8, 32, cfg.data.max_shapes).load(i)[0]) for i in range(8)]
    torch.testing.assert_close(torch.stack([preprocess(image) for image in images]), batch["pixel_values"])
    with torch.no_grad():
        ours = engine.model.eval()({k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")})
        theirs = {
            "image_embeds": model.eval().encode_image(batch["pixel_values"], normalize=True),
            "text_embeds": model.encode_text(batch["input_ids"], normalize=True),
        }
    for key, value in theirs.items():
        torch.testing.assert_close(value, ours[key], rtol=0, atol=TOL, msg=key)


# OpenCLIP name -> transformers CLIPModel name, written out here independently of bigmodel's two mappings.
_HF_NAMES = [
    (r"visual\.conv1\.weight", "vision_model.embeddings.patch_embedding.weight"),
    (r"visual\.class_embedding", "vision_model.embeddings.class_embedding"),
    (r"visual\.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    (r"visual\.ln_pre\.(\w+)", r"vision_model.pre_layrnorm.\1"),
    (r"visual\.ln_post\.(\w+)", r"vision_model.post_layernorm.\1"),
    (r"visual\.proj", "visual_projection.weight"),
    (r"visual\.transformer\.resblocks\.(\d+)\.(.+)", r"vision_model.encoder.layers.\1.\2"),
    (r"token_embedding\.weight", "text_model.embeddings.token_embedding.weight"),
    (r"positional_embedding", "text_model.embeddings.position_embedding.weight"),
    (r"transformer\.resblocks\.(\d+)\.(.+)", r"text_model.encoder.layers.\1.\2"),
    (r"ln_final\.(\w+)", r"text_model.final_layer_norm.\1"),
    (r"text_projection", "text_projection.weight"),
    (r"logit_scale", "logit_scale"),
]
_HF_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def expected_clip_tensors(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPModel's state dict made by hand from OpenCLIP's: renamed, q/k/v split, projections transposed."""
    expected = {}
    for name, tensor in original.items():
        pattern, target = next((p, t) for p, t in _HF_NAMES if re.fullmatch(p, name))
        hf_name = re.sub(f"^{pattern}$", target, name)
        for theirs, ours in {**_HF_BLOCK, "attn.out_proj": "self_attn.out_proj"}.items():
            hf_name = hf_name.replace(f".{theirs}.", f".{ours}.")
        if ".attn.in_proj_" in hf_name:
            kind = hf_name.rsplit("_", 1)[1]
            for part, chunk in zip("qkv", tensor.chunk(3), strict=True):
                expected[hf_name.replace(f"attn.in_proj_{kind}", f"self_attn.{part}_proj.{kind}")] = chunk
        elif name in ("visual.proj", "text_projection"):
            expected[hf_name] = tensor.T
        else:
            expected[hf_name] = tensor
    return expected


def test_openclip_to_bigmodel_to_transformers_is_exact(source, imported, tmp_path) -> None:
    out = export_hf(imported, tmp_path / "hf")
    clip = transformers.CLIPModel.from_pretrained(out).eval()
    exported = {k: v for k, v in clip.state_dict().items() if not k.endswith("position_ids")}
    expected = expected_clip_tensors(source["model"].state_dict())
    assert exported.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name
    ids = source["tokenizer"](CAPTIONS)
    mask = (torch.arange(ids.shape[1]) <= ids.argmax(1, keepdim=True)).long()
    with torch.no_grad():
        theirs = clip(input_ids=ids, attention_mask=mask, pixel_values=pixels(source["preprocess"]))
    expected = openclip_outputs(source["model"], source["preprocess"], source["tokenizer"])
    actual = {"image": theirs.image_embeds, "text": theirs.text_embeds, "logits": theirs.logits_per_image}
    assert_outputs_close(actual, expected)


def test_every_builtin_openclip_vit_converts_and_the_others_are_one_line_errors() -> None:
    """open_clip's own model configs: each CLIP with its own ViT and text tower maps, its real state dict's names and
    shapes (a model on the meta device, one layer per tower: the layers repeat) onto exactly bigmodel's; every other
    config is refused in one line."""
    converted, refused, shapes_checked = [], [], set()
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name)
        try:
            model_config_from_openclip(cfg)
        except ConfigError as error:
            assert "\n" not in str(error)
            refused.append(name)
            continue
        converted.append(name)
        for tower in ("vision_cfg", "text_cfg"):
            cfg[tower]["layers"] = 1
        model = model_config_from_openclip(cfg)
        shapes = json.dumps(dataclasses.asdict(dataclasses.replace(model, activation="gelu")), sort_keys=True)
        if shapes in shapes_checked:  # a quickgelu or worldwide variant of a model already checked
            continue
        shapes_checked.add(shapes)
        with torch.device("meta"):
            theirs, ours = open_clip.CLIP(**cfg).state_dict(), MultimodalEncoder(model, ("contrastive",)).state_dict()
        mapped = bigmodel_state_dict(model, theirs)
        assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in ours.items()}, name
    assert {"ViT-B-16", "ViT-B-16-quickgelu", "ViT-L-14-336", "ViT-H-14", "ViT-bigG-14"} <= set(converted)
    assert {"RN50", "convnext_base", "coca_ViT-B-32", "ViT-B-16-SigLIP", "xlm-roberta-base-ViT-B-32"} <= set(refused)


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("vision_cfg", "timm_model_name", "vit_base_patch16_224"),
        ("vision_cfg", "attentional_pool", True),
        ("vision_cfg", "pool_type", "avg"),
        ("vision_cfg", "ls_init_value", 1e-5),
        ("text_cfg", "pool_type", "first"),
        ("text_cfg", "hf_model_name", "roberta-base"),
        ("text_cfg", "no_causal_mask", True),
        ("", "init_logit_bias", -10.0),
        ("", "custom_text", True),
    ],
)
def test_a_config_bigmodel_cannot_express_is_one_line_naming_the_field(section, field, value) -> None:
    cfg = small_config(quick_gelu=True)
    (cfg[section] if section else cfg)[field] = value
    with pytest.raises(ConfigError) as error:
        model_config_from_openclip(cfg)
    message = str(error.value)
    assert message.startswith(f"{section}.{field}=" if section else f"{field}=") and "\n" not in message


@pytest.mark.parametrize(
    ("field", "changes"),
    [
        ("fusion", {"fusion": "cross"}),
        ("text_causal", {"text_causal": False}),
        ("dropout", {"dropout": 0.1}),
        ("channels", {"channels": 1}),
        ("text_mlp_dim", {"text_width": 11, "text_heads": 1, "text_mlp_dim": 15}),  # int(11 * (15 / 11)) is 14
    ],
)
def test_export_refuses_what_openclips_clip_lacks_in_one_line_naming_the_field(field, changes) -> None:
    cfg = model_config_from_openclip(small_config(quick_gelu=False))
    with pytest.raises(ConfigError) as error:
        openclip_config_from_model_config(dataclasses.replace(cfg, **changes), load_tokenizer("builtin"))
    message = str(error.value)
    assert message.startswith(f"model.{field}=") and "\n" not in message


def test_import_refuses_a_tokenizer_that_ends_captions_elsewhere(source, tmp_path, capsys) -> None:
    args = [str(source["config"]), str(source["weights"]), str(tmp_path / "run")]
    assert cli_main.main(["ckpt", "import-openclip", *args]) == 2  # the builtin tokenizer: end-of-text id 4
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: OpenCLIP pools text at the highest id") and "\n" not in error


class Plant:
    """Unpickled by pickle, it touches `marker`: the stand-in for arbitrary code in a weights file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_weights_with_code_in_them_are_refused_without_running_it(source, clip_tokenizer_dir, tmp_path, capsys) -> None:
    marker, weights = tmp_path / "code-ran", tmp_path / "planted.pt"
    torch.save({**source["model"].state_dict(), "extra": Plant(marker)}, weights)
    args = [str(source["config"]), str(weights), str(tmp_path / "run"), "--tokenizer", str(clip_tokenizer_dir)]
    assert cli_main.main(["ckpt", "import-openclip", *args]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {weights} holds more than tensors (torch.load with weights_only refused it); bigmodel never "
        "unpickles code: save the state dict alone, or as .safetensors"
    )
    assert not marker.exists()


def test_weights_that_do_not_match_the_config_are_one_line_naming_the_tensor(
    source, clip_tokenizer_dir, tmp_path, capsys
) -> None:
    config = small_config(quick_gelu=True)
    config["embed_dim"] = 48
    config_file = tmp_path / "wider.json"
    config_file.write_text(json.dumps(config))
    args = [str(config_file), str(source["weights"]), str(tmp_path / "run"), "--tokenizer", str(clip_tokenizer_dir)]
    assert cli_main.main(["ckpt", "import-openclip", *args]) == 2
    error = capsys.readouterr().err.strip()
    assert error == "error: weights tensor text_projection has shape (64, 32), the config needs (64, 48)"
