"""CLIP_benchmark's zero-shot metrics against brute-force loops over their definitions."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from bigmodel.eval.metrics import classification_metrics, classifier_weights, retrieval_metrics


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # class 6: predicted, never true
def test_classification_metrics_follow_their_definitions():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 7, generator=generator)
    labels = torch.randint(0, 6, (50,), generator=generator)  # class 6 never occurs
    metrics = classification_metrics(logits, labels)
    order = [sorted(range(7), key=lambda c: -row[c].item()) for row in logits]
    # Exact: each metric is a count over 50 rows, divided once.
    assert metrics["acc1"] == sum(o[0] == y for o, y in zip(order, labels.tolist(), strict=True)) / 50
    assert metrics["acc5"] == sum(y in o[:5] for o, y in zip(order, labels.tolist(), strict=True)) / 50
    # Both average per-class recalls in float64, possibly summed in another order: equal to a few ulps.
    expected = balanced_accuracy_score(labels.numpy(), logits.argmax(1).numpy())
    assert metrics["mean_per_class_recall"] == pytest.approx(expected, rel=1e-14)


def test_top5_is_nan_below_five_classes_and_ties_go_to_the_lower_class():
    metrics = classification_metrics(torch.zeros(4, 3), torch.tensor([0, 0, 1, 2]))
    assert math.isnan(metrics["acc5"])
    assert metrics["acc1"] == 0.5  # every score tied: class 0 predicted for every image
    assert metrics["mean_per_class_recall"] == pytest.approx(1 / 3)  # recalls 1, 0, 0


def test_class_embedding_is_the_normalised_mean_of_normalised_prompts():
    text = torch.randn(3 * 4, 8, generator=torch.Generator().manual_seed(1))  # 3 classes x 4 templates
    weights = classifier_weights(text, 3)
    for c in range(3):
        mean = torch.stack([t / t.norm() for t in text[4 * c : 4 * c + 4]]).mean(0)
        # float32 sums of 8 products: equal to a few ulps.
        torch.testing.assert_close(weights[c], mean / mean.norm(), rtol=1e-6, atol=1e-7)


def test_retrieval_recall_counts_any_caption_for_an_image_and_the_own_image_for_a_caption():
    generator = torch.Generator().manual_seed(2)
    images = torch.nn.functional.normalize(torch.randn(12, 6, generator=generator), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(30, 6, generator=generator), dim=-1)
    owner = torch.tensor([i % 12 for i in range(30)])  # images 0-5 have 3 captions, 6-11 have 2
    metrics = retrieval_metrics(images, texts, owner)
    scores = texts @ images.t()
    for k in (1, 5, 10):
        text_hits = [owner[t].item() in scores[t].argsort(descending=True)[:k].tolist() for t in range(30)]
        image_hits = [
            any(owner[t].item() == i for t in scores[:, i].argsort(descending=True)[:k].tolist()) for i in range(12)
        ]
        # Exact: shares of 30 captions and 12 images (random scores have no ties).
        assert metrics[f"image_retrieval_recall@{k}"] == sum(text_hits) / 30
        assert metrics[f"text_retrieval_recall@{k}"] == sum(image_hits) / 12
    assert set(metrics) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
