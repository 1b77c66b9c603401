"""Held-out evaluation: zero-shot image<->text retrieval, image-text matching, masked-LM and captioning accuracy."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from bigmodel.engines.base import Engine


def retrieval_metrics(image_embeds: torch.Tensor, text_embeds: torch.Tensor, caption_ids: torch.Tensor) -> dict:
    """Recall@1/@5 in both directions over the whole held-out set.

    image_embeds, text_embeds: (N, E) unit-norm, row i a true pair; caption_ids: (N, L) token ids. A retrieved
    caption that is word-for-word the true one counts as a hit (the procedural data repeats some captions, and no
    model can tell identical captions apart). `chance_r1` is the recall@1 a random ranking would get.
    """
    sim = image_embeds.float() @ text_embeds.float().t()  # (N, N)
    caption_class = torch.unique(caption_ids, dim=0, return_inverse=True)[1]  # (N,) equal for identical captions
    same_caption = caption_class[:, None] == caption_class[None, :]  # (N, N)
    metrics = {"chance_r1": same_caption.float().mean().item()}
    for name, scores in (("i2t", sim), ("t2i", sim.t())):
        top5 = scores.topk(min(5, scores.shape[1]), dim=1).indices  # (N, 5)
        hits = same_caption.gather(1, top5)  # identical-caption matrix is symmetric, so it serves both directions
        metrics[f"{name}_r1"] = hits[:, 0].float().mean().item()
        metrics[f"{name}_r5"] = hits.any(dim=1).float().mean().item()
    return metrics


@torch.no_grad()
def evaluate(engine: Engine, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Run the model over every held-out batch and return the metrics its heads allow."""
    images, texts, captions = [], [], []
    hits = dict.fromkeys(("itm", "mlm", "caption"), 0)
    counts = dict.fromkeys(hits, 0)
    for batch in batches:
        out = engine.forward_eval(batch)
        if "image_embeds" in out:
            images.append(out["image_embeds"].cpu())
            texts.append(out["text_embeds"].cpu())
            captions.append(batch["input_ids"])
        # Accuracy over what each head scores: ITM's pairs, MLM's masked tokens, captioning's real next tokens.
        for name in hits:
            if f"{name}_logits" in out:
                hits[name] += (out[f"{name}_logits"].argmax(-1) == out[f"{name}_labels"]).sum().item()
                counts[name] += out[f"{name}_labels"].numel()
    metrics: dict[str, float] = {}
    if images:
        metrics.update(retrieval_metrics(torch.cat(images), torch.cat(texts), torch.cat(captions)))
    metrics.update({f"{name}_acc": hits[name] / counts[name] for name in hits if counts[name]})
    return metrics


def evaluate_checkpoint(cfg, checkpoint: str) -> dict[str, float]:
    """Load the model weights of `checkpoint` into a model built from `cfg` and evaluate on the held-out split.

    Runs in this one process whatever layout trained the checkpoint: it holds the whole model's weights.
    """
    import dataclasses

    from bigmodel.checkpoint.manifest import verify_manifest
    from bigmodel.checkpoint.run import resolve_checkpoint
    from bigmodel.config.schema import ParallelConfig
    from bigmodel.data import build_eval_loader
    from bigmodel.engines import build_engine
    from bigmodel.parallel.context import setup_parallel
    from bigmodel.train.runtime import configure_threads

    cfg = dataclasses.replace(cfg, parallel=ParallelConfig())
    ctx = setup_parallel(cfg)
    configure_threads(cfg.train.threads, ctx.env.local_world_size)
    eval_loader = build_eval_loader(cfg, cfg.train.eval_batch_size)
    if eval_loader is None:
        raise ValueError("there is no held-out split to evaluate on; set data.eval_shards (or use data.source=shapes)")
    engine = build_engine(cfg, ctx)
    path = resolve_checkpoint(checkpoint)
    verify_manifest(path)
    engine.load_checkpoint(path)
    return evaluate(engine, eval_loader)
