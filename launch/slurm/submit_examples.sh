#!/usr/bin/env bash
# Slurm submissions. `bigmodel slurm submit` writes the batch script (the template, filled in) into the run
# directory as slurm/job.sbatch and submits it; --dry-run prints it. See docs/slurm.md.
set -euo pipefail

# GPU nodes: one process per GPU, warned 5 minutes before the time limit (save, requeue, resume).
bigmodel slurm submit --config configs/base.yaml --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00 \
    --signal USR1@300 --parallel.dp_shard=32 --train.out_dir=/shared/runs/base --dry-run

# The same in a container (pyxis/enroot), the image built from docker/gpu.Dockerfile.
bigmodel slurm submit --config configs/base.yaml --nodes 4 --gpus-per-node 8 --partition gpu \
    --container-image=registry.example.com#bigmodel:gpu --container-mounts=/shared/data:/data \
    --parallel.dp_shard=32 --train.out_dir=/shared/runs/base-container --dry-run

# CPU nodes: processes per node given explicitly.
bigmodel slurm submit --config configs/tiny.yaml --nodes 2 --nproc-per-node 2 --parallel.dp_replicate=4 \
    --train.out_dir=/tmp/runs/tiny-slurm --dry-run
