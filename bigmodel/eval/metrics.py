"""Zero-shot metrics in CLIP_benchmark's names and definitions, computed from whole-dataset embeddings."""

from __future__ import annotations

import torch

RECALL_KS = (1, 5, 10)


def classifier_weights(text_embeds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, E) class embeddings from the (C * T, E) embeddings of every class's T prompts, class-major: each class is
    the normalised mean of its normalised prompt embeddings (CLIP_benchmark's zero_shot_classifier)."""
    per_class = torch.nn.functional.normalize(text_embeds.float(), dim=-1).view(num_classes, -1, text_embeds.shape[-1])
    return torch.nn.functional.normalize(per_class.mean(dim=1), dim=-1)  # (C, E)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """acc1, acc5 and mean_per_class_recall of logits (N, C) against labels (N,).

    acc5 is NaN with fewer than 5 classes (as CLIP_benchmark reports it); mean_per_class_recall averages the recall
    of every class that occurs in `labels` (scikit-learn's balanced_accuracy_score, which CLIP_benchmark uses).
    Ties between classes go to the lower class index.
    """
    num_classes = logits.shape[1]
    # A stable descending sort, so that tied scores rank identically on every machine and rank count.
    ranked = torch.sort(logits.float(), dim=1, descending=True, stable=True).indices  # (N, C)
    correct = ranked == labels[:, None]  # (N, C), one True per row
    predicted = ranked[:, 0]
    recalls = [(predicted[labels == c] == c).double().mean() for c in torch.unique(labels)]
    return {
        "acc1": _share(correct[:, :1].any(dim=1)),
        "acc5": _share(correct[:, :5].any(dim=1)) if num_classes >= 5 else float("nan"),
        "mean_per_class_recall": torch.stack(recalls).mean().item(),
    }


def _share(hits: torch.Tensor) -> float:
    """The share of True in a bool vector, as hits / count in float64 (no float32 rounding of the count)."""
    return hits.sum().item() / hits.numel()


def retrieval_metrics(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_image: torch.Tensor, ks: tuple[int, ...] = RECALL_KS
) -> dict[str, float]:
    """Recall@k both ways over images (N, E) and captions (M, E), both unit-norm; text_image (M,) is each caption's
    image index (an image may have several captions).

    CLIP_benchmark's definitions: image_retrieval_recall@k is the share of captions whose own image is among the k
    images that score highest against it; text_retrieval_recall@k the share of images with at least one of their
    captions among the k captions that score highest against them. k larger than the candidates counts them all.
    """
    scores = text_embeds.float() @ image_embeds.float().t()  # (M, N)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(text_image)), text_image] = True
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = _hit_rate(scores, positive, k)
        metrics[f"text_retrieval_recall@{k}"] = _hit_rate(scores.t(), positive.t(), k)
    return metrics


def _hit_rate(scores: torch.Tensor, positive: torch.Tensor, k: int) -> float:
    """Share of rows of scores (Q, D) with a positive among their top k (ties broken towards lower indices)."""
    top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]  # (Q, min(k, D))
    return _share(positive.gather(1, top).any(dim=1))
