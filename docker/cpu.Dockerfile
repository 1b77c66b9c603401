# CPU image with the same install steps as CI (.ci/run, `make install`): torch first (pinned CPU build), then the
# project with its dev extras (tests, DeepSpeed, transformers, wandb).
#   docker build -f docker/cpu.Dockerfile -t bigmodel:cpu .
#   docker run --rm bigmodel:cpu bigmodel train --config configs/quickstart.yaml
#   docker run --rm --shm-size=1g bigmodel:cpu bigmodel launch --nproc 4 --config configs/tiny.yaml --parallel.dp_shard=4
#   (--shm-size: the ranks exchange gradients and parameters through /dev/shm, 64 MB by default; docs/parallelism.md)
# Under Slurm with pyxis/enroot: bigmodel slurm submit ... --nproc-per-node P --container-image=... (docs/slurm.md).
# Not built in CI (the CI machines run no Docker engine); the GPU image is docker/gpu.Dockerfile.
FROM python:3.11-slim
ARG TORCH_VERSION=2.13.0
# g++ and make: torch.compile (inductor) and DeepSpeed's CPU ops compile C++ at run time.
RUN apt-get update && apt-get install -y --no-install-recommends g++ make && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/bigmodel
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
COPY setup.py pyproject.toml README.md Makefile ./
COPY bigmodel ./bigmodel
COPY configs ./configs
COPY launch ./launch
RUN pip install --no-cache-dir -e ".[dev]"
ENV OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu
CMD ["bigmodel", "--help"]
