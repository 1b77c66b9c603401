"""Tokenizers and preprocessing through the transformers bridge: `import_hf` keeps a CLIPModel's tokenizer and token
ids, `export_hf` writes the tokenizer and preprocessor_config.json, and CLIPProcessor + CLIPModel loaded from the
export reproduce bigmodel's embeddings. References: transformers' CLIPModel, CLIPTokenizer and CLIPProcessor."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")  # the optional `hf` extra

from PIL import Image
from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

from bigmodel.checkpoint.sharded import load_sharded
from bigmodel.config import load_config
from bigmodel.config.load import config_from_dict
from bigmodel.config.schema import Config, ParallelConfig
from bigmodel.data import ShapesSource, build_eval_loader, load_tokenizer
from bigmodel.data.transforms import build_transform
from bigmodel.engines.native import NativeEngine
from bigmodel.hf.convert import TOKENIZER_DIR, export_hf, import_hf
from bigmodel.hf.processing import image_processor
from bigmodel.parallel.context import setup_parallel
from bigmodel.train.loop import train
from tests.support.clip_tokenizer import BOS, EOS, VOCAB_SIZE
from tests.unit.hf.test_clip import perturb, small_clip_config

ROOT = Path(__file__).resolve().parents[3]
CAPTIONS = [
    "a photo of a cat",
    "Two dogs playing in the snow!!",
    "Café au lait — crème brûlée in Zürich",
    "emoji 🐱🚀 and a naïve façade",
    "a long caption: " + "the quick brown fox jumps over the lazy dog " * 12,  # truncated at 77 tokens
]
# Same weights in fp32, different kernels (eager/sdpa attention, mask forms): a few ulps on unit-norm embeddings
# (tests/unit/hf/test_clip.py); a misplaced tensor or a wrongly pooled token moves them by more than 1e-2.
TOL = 1e-5
OWN_IDS = {"pad_token_id": EOS, "bos_token_id": BOS, "eos_token_id": EOS}  # as in OpenAI's repos today
LEGACY_IDS = {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}  # older configs: CLIP pools at argmax(ids)


def saved_clip(folder: Path, clip_tokenizer_dir: Path, ids: dict[str, int]) -> CLIPModel:
    """A small random CLIPModel with CLIP's vocabulary and context, saved with CLIPTokenizer into `folder`."""
    torch.manual_seed(0)
    text = {"vocab_size": VOCAB_SIZE, "max_position_embeddings": 77, **ids}
    clip = CLIPModel(small_clip_config(text)).eval()
    perturb(clip, seed=1)
    clip.save_pretrained(folder)
    CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir)).save_pretrained(str(folder))
    return clip


def loaded_run(checkpoint: Path) -> tuple[Config, torch.nn.Module]:
    """The checkpoint's config and its model through the engine's own loader, in one process."""
    saved = json.loads((checkpoint / "manifest.json").read_text())["extra"]["config"]
    cfg = dataclasses.replace(config_from_dict(saved), parallel=ParallelConfig())
    engine = NativeEngine(cfg, setup_parallel(cfg))
    load_sharded(checkpoint, engine)
    return cfg, engine.model.eval()


@torch.no_grad()
def bigmodel_text_embeds(cfg: Config, model: torch.nn.Module, captions: list[str]) -> torch.Tensor:
    """Unit-norm text embeddings of `captions` tokenized by bigmodel's loader of the run's data.tokenizer."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    encoded = [tokenizer.encode(caption, cfg.model.context_length) for caption in captions]
    ids, mask = (torch.tensor([row[i] for row in encoded]) for i in (0, 1))
    pixels = torch.zeros(len(captions), 3, cfg.model.image_size, cfg.model.image_size)
    return model({"pixel_values": pixels, "input_ids": ids, "attention_mask": mask})["text_embeds"]


@torch.no_grad()
def clip_text_embeds(clip: CLIPModel, tokenizer, captions: list[str]) -> torch.Tensor:
    """transformers' reference: get_text_features on CLIPTokenizer's ids, normalised as CLIP's logits use them."""
    inputs = tokenizer(captions, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    features = clip.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    features = features if isinstance(features, torch.Tensor) else features.pooler_output  # transformers 5
    return torch.nn.functional.normalize(features, dim=-1)


@pytest.mark.parametrize("ids", [OWN_IDS, LEGACY_IDS], ids=["own-ids", "legacy-eos-2"])
def test_import_keeps_the_tokenizer_and_gives_clips_text_embeddings(clip_tokenizer_dir, tmp_path, ids) -> None:
    clip = saved_clip(tmp_path / "clip", clip_tokenizer_dir, ids)
    checkpoint = import_hf(tmp_path / "clip", tmp_path / "run")
    run_config = load_config(tmp_path / "run" / "config.yaml")
    assert run_config.data.tokenizer == str((tmp_path / "run" / TOKENIZER_DIR).absolute())
    cfg, model = loaded_run(checkpoint)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (BOS, EOS, EOS)
    reference = clip_text_embeds(clip, CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir)), CAPTIONS)
    torch.testing.assert_close(bigmodel_text_embeds(cfg, model, CAPTIONS), reference, rtol=0, atol=TOL)


def test_import_export_round_trip_keeps_the_token_ids_and_outputs(clip_tokenizer_dir, tmp_path) -> None:
    clip = saved_clip(tmp_path / "clip", clip_tokenizer_dir, OWN_IDS)
    out = export_hf(import_hf(tmp_path / "clip", tmp_path / "run"), tmp_path / "exported")
    text_config = json.loads((out / "config.json").read_text())["text_config"]
    assert {key: text_config[key] for key in OWN_IDS} == OWN_IDS
    exported, processor = CLIPModel.from_pretrained(out).eval(), CLIPProcessor.from_pretrained(out)
    images = [Image.fromarray(ShapesSource("eval", len(CAPTIONS), 32, 2).load(i)[0]) for i in range(len(CAPTIONS))]
    inputs = processor(
        text=CAPTIONS, images=images, padding="max_length", truncation=True, max_length=77, return_tensors="pt"
    )
    with torch.no_grad():
        theirs, ours = exported(**inputs), clip(**inputs)
    # Before the tokenizer travelled with the model, bos/eos came back as 3/4 and the logits moved by 2.4.
    for name in ("text_embeds", "image_embeds", "logits_per_image"):
        torch.testing.assert_close(getattr(theirs, name), getattr(ours, name), rtol=0, atol=TOL, msg=name)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (OWN_IDS, r"^tokenizer builtin ends captions with id 4 but the CLIP model pools at eos_token_id 49407"),
        (LEGACY_IDS, r"^the CLIP model's eos_token_id is 2 .* tokenizer builtin's end-of-text id 4 is not its highest"),
    ],
    ids=["own-ids", "legacy-eos-2"],
)
def test_import_refuses_a_tokenizer_that_ends_captions_elsewhere(clip_tokenizer_dir, tmp_path, ids, message) -> None:
    saved_clip(tmp_path / "clip", clip_tokenizer_dir, ids)
    with pytest.raises(ValueError, match=message) as error:
        import_hf(tmp_path / "clip", tmp_path / "run", tokenizer="builtin")
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory) -> Path:
    """A tiny CLIP-layout run on the embedded shapes data (builtin tokenizer, transform shapes), one step."""
    out = tmp_path_factory.mktemp("tiny-clip")
    overrides = ["--train.steps=1", "--train.warmup_steps=0", "--log.progress=false", "--log.wandb=disabled"]
    overrides += ["--data.eval_size=16", f"--train.out_dir={out}"]
    return train(load_config(ROOT / "configs" / "tiny-clip.yaml", overrides)).checkpoint


def test_exported_processor_and_model_reproduce_bigmodels_embeddings(shapes_run: Path, tmp_path: Path) -> None:
    out = export_hf(shapes_run, tmp_path / "hf")
    cfg, model = loaded_run(shapes_run)
    batch = next(iter(build_eval_loader(cfg, 16)))
    samples = [ShapesSource("eval", 16, cfg.model.image_size, cfg.data.max_shapes).load(i) for i in range(16)]
    processor = CLIPProcessor.from_pretrained(out)
    inputs = processor(
        text=[caption for _, caption in samples],
        images=[Image.fromarray(image) for image, _ in samples],
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    )
    assert torch.equal(inputs["input_ids"], batch["input_ids"])
    assert torch.equal(inputs["attention_mask"], batch["attention_mask"])
    # transform shapes on images already model.image_size square: no resize; (x / 255 - 0.5) / 0.5 against
    # transformers' x * (1 / 255), then normalise: float32 rounding only (measured 6e-8).
    torch.testing.assert_close(inputs["pixel_values"], batch["pixel_values"], rtol=0, atol=1e-6)
    with torch.no_grad():
        theirs = CLIPModel.from_pretrained(out).eval()(**inputs)
        ours = model(batch)
    for name in ("text_embeds", "image_embeds"):
        torch.testing.assert_close(getattr(theirs, name), ours[name], rtol=0, atol=TOL, msg=name)


def test_clip_transform_exports_its_resize_crop_and_normalisation() -> None:
    from sklearn.datasets import load_sample_image

    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    overrides = ["--data.transform=clip", "--model.image_size=100", "--model.patch_size=10"]
    overrides += [f"--data.image_mean={mean}", f"--data.image_std={std}"]
    cfg = load_config(ROOT / "configs" / "tiny-clip.yaml", overrides)
    processor = image_processor(cfg)
    assert processor.size == {"shortest_edge": 100} and processor.crop_size == {"height": 100, "width": 100}
    assert list(processor.image_mean) == mean and list(processor.image_std) == std
    photo = load_sample_image("china.jpg")  # 427 x 640 -> 100 x 149: a margin where both crop rules agree
    theirs = processor(images=Image.fromarray(photo), return_tensors="np")["pixel_values"][0]
    ours = build_transform(cfg, train=False)(photo, np.random.default_rng(0))
    # transformers' default processor resizes with torch's antialiased bicubic, Pillow's weights round otherwise:
    # at most one uint8 level (tests/unit/data/test_transforms.py measures it), after normalisation 1/255/min(std).
    assert np.abs(theirs - ours).max() <= 1 / 255 / min(std) + 1e-5


def test_export_writes_the_tokenizer_of_a_fused_model_too(tmp_path: Path) -> None:
    overrides = ["--train.steps=1", "--train.warmup_steps=0", "--log.progress=false", "--log.wandb=disabled"]
    overrides += ["--data.eval_size=16", f"--train.out_dir={tmp_path / 'run'}", "--model.channels=1"]
    checkpoint = train(load_config(ROOT / "configs" / "tiny.yaml", overrides)).checkpoint
    out = export_hf(checkpoint, tmp_path / "hf")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    expected = load_tokenizer("builtin").encode("a large red circle", 24)[0]
    assert tokenizer("a large red circle", padding="max_length", truncation=True)["input_ids"] == expected
    assert tokenizer.mask_token_id == 2
    assert not (out / "preprocessor_config.json").exists()  # grey images: CLIPImageProcessor makes RGB only
