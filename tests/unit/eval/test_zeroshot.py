"""Zero-shot tasks on a tiny model: the embeddings are the contrastive head's, and the metrics follow from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bigmodel.config import load_config
from bigmodel.config.layout import active_objectives
from bigmodel.data import build_tokenizer
from bigmodel.eval.datasets import load_classification, load_retrieval
from bigmodel.eval.metrics import classification_metrics, retrieval_metrics
from bigmodel.eval.zeroshot import Embedder, zeroshot_classification, zeroshot_retrieval
from bigmodel.models import build_model
from tests.unit.eval.test_datasets import write_image_folder

TINY = Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    cfg = load_config(TINY)
    return Embedder(cfg, build_model(cfg.model, active_objectives(cfg.train.loss_weights), seed=3))


def test_embeddings_are_the_models_contrastive_embeddings(embedder, tmp_path):
    write_image_folder(tmp_path, per_class=1)
    data, _ = load_classification(str(tmp_path), None)
    captions = [f"a large red circle number {d}" for d in range(10)]
    images, texts = embedder.images(data.images, range(10)), embedder.texts(captions)

    pixels = torch.stack(
        [torch.from_numpy(embedder.transform(data.images.read(i), np.random.default_rng(0))) for i in range(10)]
    )
    encoded = [build_tokenizer(load_config(TINY).data).encode(c, embedder.context_length) for c in captions]
    batch = {
        "pixel_values": pixels,
        "input_ids": torch.tensor([e[0] for e in encoded]),
        "attention_mask": torch.tensor([e[1] for e in encoded]),
        "mlm_input_ids": torch.tensor([e[0] for e in encoded]),
        "mlm_labels": torch.full((10, embedder.context_length), -100),
    }
    with torch.no_grad():
        out = embedder.model(batch)
    # The same operations on the same inputs; only the batch composition of the fused rows differs, which the
    # towers never see: equal to float32 rounding of reordered kernels.
    torch.testing.assert_close(images, out["image_embeds"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(texts, out["text_embeds"], rtol=1e-5, atol=1e-6)


def test_classification_scores_images_against_the_mean_prompt_of_each_class(embedder, tmp_path):
    write_image_folder(tmp_path, per_class=1)
    data, _ = load_classification(str(tmp_path), None)
    templates = ["a {c}", "a small red {c}"]
    metrics = zeroshot_classification(embedder, data, templates, batch_size=7)

    # Reference: one class at a time, one prompt at a time, one image at a time.
    classes = []
    for name in data.classnames:
        prompts = torch.cat([embedder.texts([t.replace("{c}", name)]) for t in templates])
        mean = (prompts / prompts.norm(dim=-1, keepdim=True)).mean(0)
        classes.append(mean / mean.norm())
    images = torch.cat([embedder.images(data.images, range(i, i + 1)) for i in range(len(data.images))])
    expected = classification_metrics(images @ torch.stack(classes).t(), torch.tensor(data.labels))
    # Batched and one-at-a-time embeddings differ by float32 rounding (1e-7); the 10 images' rankings do not
    # change with it unless two classes tie within that, which these random weights do not: exact.
    assert metrics == expected
    assert set(metrics) == {"acc1", "acc5", "mean_per_class_recall"}


def test_retrieval_uses_every_caption(embedder, tmp_path):
    import json

    from tests.unit.eval.test_datasets import digit_images, png

    captions = {}
    for n, (image, digit) in enumerate(digit_images(1)):
        (tmp_path / f"{n}.png").write_bytes(png(image))
        captions[f"{n}.png"] = [f"a {digit}", f"a large red circle {digit}", "a small blue square"]
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    data = load_retrieval(str(tmp_path))
    metrics = zeroshot_retrieval(embedder, data, batch_size=4)
    flat = [c for texts in data.captions for c in texts]
    owner = torch.arange(10).repeat_interleave(3)
    expected = retrieval_metrics(embedder.images(data.images, range(10)), embedder.texts(flat), owner)
    assert metrics == expected  # as above: rankings do not move with float32 rounding of the batch size
