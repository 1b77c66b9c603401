"""Worker for test_zeroshot_ranks.py: both zero-shot tasks of one checkpoint over this job's ranks; rank 0 writes
every rank's metrics as JSON to --out.

    torchrun --nproc-per-node=N zeroshot_worker.py --out FILE CHECKPOINT CLASSIFICATION_DIR RETRIEVAL_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch.distributed as dist

from bigmodel.eval import evaluate_zeroshot
from bigmodel.parallel.env import init_distributed, read_dist_env


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("checkpoint")
    parser.add_argument("classification")
    parser.add_argument("retrieval")
    args = parser.parse_args()
    init_distributed(read_dist_env(), backend="gloo")
    group = dist.group.WORLD
    mine = {
        "zeroshot_classification": evaluate_zeroshot(
            args.checkpoint, "zeroshot_classification", args.classification, batch_size=8, group=group
        )["metrics"],
        "zeroshot_retrieval": evaluate_zeroshot(
            args.checkpoint, "zeroshot_retrieval", args.retrieval, batch_size=8, group=group
        )["metrics"],
    }
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(every))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
