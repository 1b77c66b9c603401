# GPU image: CUDA + cuDNN devel base, PyTorch (CUDA build, same version as CI's TORCH_SPEC), DeepSpeed with its
# fused CUDA/CPU optimizer ops compiled at build time (no JIT compile when a job starts), and this project.
#   docker build -f docker/gpu.Dockerfile -t bigmodel:gpu .
#   docker run --rm --gpus all --ipc=host bigmodel:gpu bigmodel launch --nproc 8 --config configs/base.yaml
# Under Slurm with pyxis/enroot: bigmodel slurm submit ... --container-image=REGISTRY#bigmodel:gpu (docs/slurm.md);
# on Kubernetes: launch/kubernetes/train-job.yaml. Not built in CI (no Docker engine there).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG DEEPSPEED_VERSION=0.19.8
# Compute capabilities the DeepSpeed ops are compiled for: A100 (8.0), L40S/RTX 6000 Ada (8.9), H100/H200 (9.0).
ARG TORCH_CUDA_ARCH_LIST="8.0;8.9;9.0"

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}
# python3-dev and ninja: DeepSpeed's op builds; libaio-dev: its async I/O op; numactl: --bind_cores_to_rank.
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-dev python3-venv g++ make ninja-build git libaio-dev numactl \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /opt/bigmodel
# torch first, pinned, so that pip never swaps it for another build (as the Makefile does).
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" && pip install ninja packaging wheel
# Pre-built ops: the fused Adam (GPU), the CPU Adam (ZeRO-Offload) and the shared-memory CPU communication op.
RUN DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 DS_BUILD_SHM_COMM=1 DS_BUILD_AIO=1 \
        pip install --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}" \
    && ds_report | grep -E "fused_adam|cpu_adam"

COPY setup.py pyproject.toml README.md Makefile ./
COPY bigmodel ./bigmodel
COPY configs ./configs
COPY launch ./launch
RUN pip install -e ".[deepspeed,hf,wandb]" && python -c "import torch, deepspeed, bigmodel"
CMD ["bigmodel", "--help"]
