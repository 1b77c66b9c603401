# CPU image with the same install steps as CI (.ci/run): torch first (pinned CPU build), then the project.
#   docker build -f docker/cpu.Dockerfile -t bigmodel:cpu .
#   docker run --rm bigmodel:cpu bigmodel train --config configs/quickstart.yaml
# Not built in CI (the CI machines run no Docker engine); the GPU image comes with the launcher work.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends g++ make && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/bigmodel
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY setup.py pyproject.toml README.md Makefile ./
COPY bigmodel ./bigmodel
COPY configs ./configs
RUN pip install --no-cache-dir -e ".[hf,wandb]"
ENV OMP_NUM_THREADS=1
CMD ["bigmodel", "--help"]
