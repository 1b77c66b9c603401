"""Zero-shot evaluation in CLIP_benchmark's terms: classification with class-name prompts and retrieval with
several captions per image, in one process or split over a job's data-parallel ranks (docs/evaluation.md)."""

from bigmodel.eval.zeroshot import TASKS, Embedder, evaluate_zeroshot, run_zeroshot

__all__ = ["TASKS", "Embedder", "evaluate_zeroshot", "run_zeroshot"]
