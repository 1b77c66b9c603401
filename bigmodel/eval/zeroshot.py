"""Zero-shot classification and retrieval of a checkpoint, in one process or split over the ranks of a job.

Embeddings come from the model's contrastive (or SigLIP) head, images through the run's evaluation transform and
text through the run's tokenizer, as in training. Every rank computes the same metrics from the same gathered
embeddings (bigmodel.eval.distributed), so any number of processes reports one process's figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
import torch.distributed as dist

from bigmodel.config.schema import Config
from bigmodel.data.build import build_tokenizer
from bigmodel.data.transforms import build_transform
from bigmodel.eval.datasets import ClassificationSet, Images, RetrievalSet, load_classification, load_retrieval
from bigmodel.eval.distributed import embed_in_batches
from bigmodel.eval.metrics import classification_metrics, classifier_weights, retrieval_metrics
from bigmodel.eval.templates import OPENAI_IMAGENET_TEMPLATES, check_templates
from bigmodel.models.encoder import MultimodalEncoder

Task = Literal["zeroshot_classification", "zeroshot_retrieval"]
TASKS: tuple[str, ...] = get_args(Task)


class Embedder:
    """Unit-norm image and text embeddings (B, E) of a model with a contrastive or SigLIP head, in eval mode."""

    def __init__(self, cfg: Config, model: MultimodalEncoder) -> None:
        if not model.embeds:
            raise ValueError(
                "this checkpoint has no contrastive head to embed images and text with; train with "
                "train.loss_weights.contrastive > 0 (or siglip > 0)"
            )
        self.model = model.eval()
        self.tokenizer = build_tokenizer(cfg.data)
        self.transform = build_transform(cfg, train=False)
        self.context_length = cfg.model.context_length

    @torch.no_grad()
    def images(self, images: Images, indices: range) -> torch.Tensor:
        """Embeddings of images[indices]."""
        rng = np.random.default_rng(0)  # the evaluation transform draws nothing
        pixels = torch.stack([torch.from_numpy(self.transform(images.read(i), rng)) for i in indices])
        head = self.model.contrastive
        # The path MultimodalEncoder.join takes: the vision tower's normalised class token, projected.
        pooled = self.model.vision(pixels)[:, 0]  # (B, Dv)
        return torch.nn.functional.normalize(head.visual_projection(pooled), dim=-1)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        """Embeddings of captions, each tokenized to the model's context length."""
        encoded = [self.tokenizer.encode(text, self.context_length) for text in texts]
        ids = torch.tensor([e[0] for e in encoded])  # (B, L)
        mask = torch.tensor([e[1] for e in encoded])  # (B, L)
        pooled = self.model.pool_text(self.model.text(ids, mask), mask)  # (B, Dt)
        return torch.nn.functional.normalize(self.model.contrastive.text_projection(pooled), dim=-1)


def zeroshot_classification(
    embedder: Embedder,
    data: ClassificationSet,
    templates: list[str] | None,
    batch_size: int,
    group: dist.ProcessGroup | None = None,
) -> dict[str, float]:
    """acc1, acc5 and mean_per_class_recall (bigmodel.eval.metrics) of `data`, classes embedded from `templates`
    (None: OpenAI's 80 ImageNet templates); every rank of `group` calls it and gets the same result."""
    templates = check_templates(list(templates or OPENAI_IMAGENET_TEMPLATES), "the templates")
    prompts = [t.replace("{c}", name) for name in data.classnames for t in templates]  # class-major
    text = embed_in_batches(len(prompts), batch_size, lambda b: embedder.texts(prompts[b.start : b.stop]), group)
    weights = classifier_weights(text, len(data.classnames))  # (C, E)
    images = embed_in_batches(len(data.images), batch_size, lambda b: embedder.images(data.images, b), group)
    return classification_metrics(images.float() @ weights.t(), torch.tensor(data.labels))


def zeroshot_retrieval(
    embedder: Embedder, data: RetrievalSet, batch_size: int, group: dist.ProcessGroup | None = None
) -> dict[str, float]:
    """image_retrieval_recall@{1,5,10} and text_retrieval_recall@{1,5,10} of `data`; every rank of `group` calls
    it and gets the same result."""
    captions = [caption for texts in data.captions for caption in texts]
    owner = torch.tensor([i for i, texts in enumerate(data.captions) for _ in texts])  # (M,)
    text = embed_in_batches(len(captions), batch_size, lambda b: embedder.texts(captions[b.start : b.stop]), group)
    images = embed_in_batches(len(data.images), batch_size, lambda b: embedder.images(data.images, b), group)
    return retrieval_metrics(images, text, owner)


def evaluate_zeroshot(
    checkpoint: str | Path,
    task: Task,
    dataset: str,
    templates_file: str | None = None,
    batch_size: int = 64,
    group: dist.ProcessGroup | None = None,
) -> dict:
    """One zero-shot task on a checkpoint, in CLIP_benchmark's result layout: {"dataset", "model", "pretrained",
    "task", "metrics", "language"}. Every rank of `group` loads the whole model and calls it (see the module doc)."""
    from bigmodel.tools.caption import load_model

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    cfg, model = load_model(checkpoint)
    embedder = Embedder(cfg, model)
    if task == "zeroshot_classification":
        data, templates = load_classification(dataset, templates_file, cfg.data.eval_size, cfg.model.image_size)
        metrics = zeroshot_classification(embedder, data, templates, batch_size, group)
    else:
        if templates_file:
            raise ValueError("--templates applies to zeroshot_classification only")
        metrics = zeroshot_retrieval(embedder, load_retrieval(dataset), batch_size, group)
    return {
        "dataset": dataset,
        "model": "bigmodel",
        "pretrained": str(checkpoint),
        "task": task,
        "metrics": metrics,
        "language": "en",
    }


def run_zeroshot(
    checkpoint: str | Path, task: Task, dataset: str, templates_file: str | None = None, batch_size: int = 64
) -> dict:
    """evaluate_zeroshot in the job this process was started in (torchrun, srun, mpirun or none): joins the job's
    gloo group when there are several processes (or uses the one already joined), shares the node's cores among
    them, and leaves a group it joined."""
    from bigmodel.parallel.env import init_distributed, read_dist_env
    from bigmodel.train.runtime import configure_threads

    env = read_dist_env()
    configure_threads(0, env.local_world_size)
    if not env.distributed:
        return evaluate_zeroshot(checkpoint, task, dataset, templates_file, batch_size)
    joined = not dist.is_initialized()
    init_distributed(env, backend="gloo")  # the model runs on the CPU; gloo carries the gathered embeddings
    try:
        return evaluate_zeroshot(checkpoint, task, dataset, templates_file, batch_size, dist.group.WORLD)
    finally:
        if joined:  # a group someone else started stays theirs
            dist.destroy_process_group()
