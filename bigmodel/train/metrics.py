"""Where numbers go: metrics.jsonl / eval.jsonl in the run directory, Weights & Biases, and the MFU figure."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bigmodel.config.schema import Config


def measure_matmul_peak(dtype: torch.dtype, device: torch.device, size: int = 1024, seconds: float = 0.3) -> float:
    """This device's dense matmul rate in FLOP/s at `dtype`, measured now (the denominator of MFU).

    Measured rather than looked up because on a CPU it depends on the cores this process may use.
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up: first call pays for thread-pool start and kernel selection
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or runs < 3:
        a @ b
        runs += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * runs / (time.perf_counter() - start)


class JsonlWriter:
    """Appends one JSON object per line; flushed each write so a crash loses nothing already logged."""

    def __init__(self, path: Path):
        self.file = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def wandb_mode(requested: str) -> str:
    """The W&B mode to use: online falls back to offline when no API key is configured."""
    if requested == "online" and not (os.environ.get("WANDB_API_KEY") or Path.home().joinpath(".netrc").exists()):
        print("wandb: no WANDB_API_KEY found, logging offline instead of online", file=sys.stderr)
        return "offline"
    return requested


class MetricsLogger:
    """Rank 0's sink for training and evaluation metrics: jsonl files always, W&B when enabled."""

    def __init__(self, cfg: Config, run_dir: Path, config_dict: dict[str, Any]):
        self.train_file = JsonlWriter(run_dir / "metrics.jsonl")
        self.eval_file = JsonlWriter(run_dir / "eval.jsonl")
        self.wandb_run = None
        mode = wandb_mode(cfg.log.wandb)
        if mode != "disabled":
            self.wandb_run = self._start_wandb(cfg, run_dir, config_dict, mode)

    @staticmethod
    def _start_wandb(cfg: Config, run_dir: Path, config_dict: dict[str, Any], mode: str):
        try:
            import wandb
        except ImportError:
            print("wandb: not installed (pip install 'bigmodel[wandb]'); logging to jsonl files only", file=sys.stderr)
            return None
        name = cfg.log.run_name or run_dir.name
        return wandb.init(
            project=cfg.log.wandb_project,
            name=name,
            dir=str(run_dir),
            mode=mode,
            config=config_dict,
            reinit="finish_previous",
        )

    def log_train(self, record: dict[str, Any]) -> None:
        self.train_file.write(record)
        if self.wandb_run is not None:
            self.wandb_run.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=record["step"])

    def log_eval(self, record: dict[str, Any]) -> None:
        self.eval_file.write(record)
        if self.wandb_run is not None:
            self.wandb_run.log({f"eval/{k}": v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self.train_file.close()
        self.eval_file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


class NullLogger:
    """The logger of ranks other than the main one: accepts everything, writes nothing."""

    def log_train(self, record: dict[str, Any]) -> None:
        pass

    def log_eval(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
