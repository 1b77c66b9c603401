# The two commands of the README: `make quickstart` (install, pretrain on the embedded dataset with 4 processes,
# report held-out retrieval before and after) and `make test` (install, run the whole test suite). Both create .venv if needed.
PYTHON ?= python3
VENV ?= .venv
# torch first, pinned, so that the project's `torch>=2.6` is already satisfied and pip never pulls another build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The torch spec goes into the project's install too, so that what the test extras pull (torchvision through
# open_clip) is resolved against that torch instead of upgrading it.

.PHONY: install quickstart test lint format clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]" "$(TORCH_SPEC)"
	$(BIN)/python tests/support/install_torchvision_cpu.py
	touch $(STAMP)

install: $(STAMP)

# 4 processes: 2-way sharded data parallel x 2-way tensor parallel (torchrun on this machine).
quickstart: $(STAMP)
	$(BIN)/bigmodel launch --nproc 4 --config configs/quickstart.yaml --parallel.dp_shard=2 --parallel.tp=2

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=30

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf runs/quickstart .pytest_cache
