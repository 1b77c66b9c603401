"""The training loop: data in, engine steps, metrics, evaluation and checkpoints out.

The same loop runs every layout and both engines: it talks to an Engine and a data loader that already know their
data-parallel rank, and hands checkpointing the engine's state (the engine saves it through bigmodel.checkpoint).
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bigmodel.checkpoint.io import Purger
from bigmodel.checkpoint.manifest import require_fields, verify_checkpoint
from bigmodel.checkpoint.run import check_same_locks, check_same_model, find_resume_checkpoint, step_folder
from bigmodel.checkpoint.sharded import PendingSave
from bigmodel.config import Config, config_to_dict, save_config
from bigmodel.config.validate import microbatches_per_step
from bigmodel.data import build_eval_loader, build_train_loader
from bigmodel.data.ledger import LEDGER_DIR, Layout, Ledger
from bigmodel.data.streaming import merge_rank_states
from bigmodel.engines import Engine, build_engine
from bigmodel.losses import active_objectives
from bigmodel.models.flops import flops_per_sample
from bigmodel.parallel.context import ParallelContext, setup_parallel
from bigmodel.parallel.timeline import write_timeline
from bigmodel.train.evaluate import evaluate
from bigmodel.train.metrics import MetricsLogger, NullLogger, measure_matmul_peak
from bigmodel.train.profile import StepProfiler
from bigmodel.train.runtime import configure_threads, seed_everything, set_deterministic
from bigmodel.train.stop import StopRequest

RESUME_FIELDS = ("step", "samples_seen", "loader")
"""What a resume takes from a checkpoint's `extra` besides the engine's state (Trainer.save writes them)."""


class TrainingDiverged(RuntimeError):
    """The loss stopped being a finite number."""


@dataclass
class TrainResult:
    """What a finished run reports: its directory, final training loss and held-out metrics before and after."""

    run_dir: Path
    final_loss: float
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    stopped_by: str | None = None
    """The signal that stopped the run early (after saving `checkpoint`), or None if it ran to the end."""


def split_microbatches(batch: dict[str, torch.Tensor], count: int) -> list[dict[str, torch.Tensor]]:
    """Split a batch into `count` contiguous microbatches along dimension 0."""
    pieces = {name: value.tensor_split(count) for name, value in batch.items()}
    return [{name: parts[i] for name, parts in pieces.items()} for i in range(count)]


def prepare_run_dir(cfg: Config) -> Path:
    """Create the run directory and write the resolved config into it.

    An existing run there is kept: its metrics files are appended to (and it says so), its checkpoints stay.
    """
    run_dir = Path(cfg.train.out_dir)
    if (run_dir / "metrics.jsonl").exists():
        print(
            f"note: {run_dir} already holds a run; its metrics.jsonl and eval.jsonl are appended to "
            "(set train.out_dir to start a separate run)",
            file=sys.stderr,
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def training_flops_per_sample(cfg: Config) -> float:
    """Model FLOPs of forward + backward for one sample (the numerator of MFU)."""
    masked = cfg.data.mlm_probability * cfg.model.context_length
    return flops_per_sample(cfg.model, active_objectives(cfg.train.loss_weights), masked_tokens=masked)["train"]


class Trainer:
    """Runs `cfg.train.steps` optimizer steps of `engine` on `loader`, logging, evaluating and checkpointing.

    Every rank runs `fit`; only the main rank logs, shows progress and writes files.
    """

    def __init__(
        self,
        cfg: Config,
        ctx: ParallelContext,
        run_dir: Path,
        engine: Engine,
        loader,
        eval_loader,
        logger,
        stop: StopRequest | None = None,
    ):
        self.cfg = cfg
        self.ctx = ctx
        self.run_dir = run_dir
        self.engine = engine
        self.loader = loader
        self.eval_loader = eval_loader
        self.logger = logger
        self.samples_seen = 0
        self.stop = stop or StopRequest()
        self.timeline_steps: list[list[list[dict]]] = []
        """Per recorded pipeline step, each pipeline rank's timeline events (log.pp_timeline_step)."""
        self.stopped_by: str | None = None
        self.pending: PendingSave | None = None  # a background save still being written
        self.purger = Purger()  # deletes replaced and retired checkpoints in the background
        self.ledger = build_ledger(cfg, ctx, run_dir) if cfg.data.ledger else None
        self.resumed_ledger: dict[str, Any] | None = None
        """The resumed checkpoint's ledger entry (its chain hash), checked against the ledger files by fit."""
        log = cfg.log
        self.profiler = StepProfiler(
            log.profile_step, log.profile_steps, cfg.train.steps, run_dir / "profile", ctx.env.rank, ctx.is_main
        )
        # Background saves run their collectives on a group of their own, so they never interleave with training's.
        background = cfg.checkpoint.async_save and ctx.env.distributed
        self.checkpoint_group = torch.distributed.new_group(backend="gloo") if background else None
        self.flops_per_sample = training_flops_per_sample(cfg)
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        # Every process gets the same share of the machine, so the job's peak is one process's times the world.
        self.peak_flops = measure_matmul_peak(dtype, engine.device) * ctx.env.world_size

    def run_eval(self, step: int) -> dict[str, float]:
        if self.eval_loader is None:
            return {}
        metrics = evaluate(self.engine, self.eval_loader)
        self.logger.log_eval({"step": step, **metrics})
        return metrics

    def save(self, step: int) -> Path:
        """Save a sharded checkpoint (every rank writes its shards; the main rank writes the manifest) and return
        its folder. With checkpoint.async_save it is still being written when this returns (see finish_save)."""
        self.finish_save()
        extra = {
            "samples_seen": self.samples_seen,
            "loader": self.loader_state(),
            "config": config_to_dict(self.cfg),
        }
        if self.ledger is not None:
            extra["ledger"] = self.ledger.sync()
        checkpoint = self.cfg.checkpoint
        self.pending = self.engine.save_checkpoint(
            self.run_dir, step, extra, checkpoint.keep, checkpoint.async_save, self.checkpoint_group, self.purger
        )
        return self.pending.path

    def loader_state(self) -> dict[str, Any]:
        """The loader's state for the checkpoint. A streaming loader's differs per data-parallel rank, so every
        rank's is gathered and merged on the main rank (all ranks call this, as they call save)."""
        state = self.loader.state_dict()
        if state.get("mode") != "streaming":
            return state
        gathered = gather_to_main(state, self.ctx)
        return merge_rank_states(gathered) if self.ctx.is_main else state

    def finish_save(self, only_if_done: bool = False) -> None:
        """Wait for a background save to complete (with `only_if_done`, only collect one that already has)."""
        if self.pending is not None and (self.pending.done() or not only_if_done):
            self.pending.wait()
            self.pending = None

    def stop_requested(self, step: int, checkpoint: Path | None) -> Path | None:
        """If any rank got a stop signal: save (unless `checkpoint` is this step's), write stopped.json and return
        the checkpoint; else None. Every rank calls it after each step."""
        received = self.stop.agreed(None, self.engine.device)
        if received is None:
            return None
        self.stopped_by = received.name
        if checkpoint is None or checkpoint != step_folder(self.run_dir, step):
            checkpoint = self.save(step)
        self.finish_save()
        if self.ctx.is_main:
            record = {"step": step, "signal": received.name, "checkpoint": str(checkpoint)}
            (self.run_dir / "stopped.json").write_text(json.dumps(record) + "\n", encoding="utf-8")
            print(
                f"stopped by {received.name} after step {step}; checkpoint {checkpoint}; continue with --resume auto",
                file=sys.stderr,
            )
        return checkpoint

    def resume(self, spec: str) -> int:
        """Load the checkpoint `spec` names (see find_resume_checkpoint) and return the step it was saved at."""
        path = find_resume_checkpoint(spec, self.run_dir)
        if path is None:
            if self.ctx.is_main:
                print(f"note: no checkpoint in {self.run_dir} yet; starting from step 0", file=sys.stderr)
            return 0
        checked = verify_checkpoint(path)
        objectives = active_objectives(self.cfg.train.loss_weights)
        check_same_model(path, config_to_dict(self.cfg)["model"], objectives)
        check_same_locks(path, self.cfg.model, objectives, self.cfg.train)
        extra = require_fields(self.engine.load_checkpoint(path, checked), RESUME_FIELDS, f"{path}'s manifest extra")
        note = self.loader.load_state_dict(extra["loader"])
        if note and self.ctx.is_main:
            print(f"note: {note}", file=sys.stderr)
        self.samples_seen = extra["samples_seen"]
        self.resumed_ledger = extra.get("ledger")
        if self.ctx.is_main:
            print(f"resumed from {path} (step {extra['step']})", file=sys.stderr)
        return extra["step"]

    def open_ledger(self, start_step: int) -> None:
        """Continue the run's ledger after `start_step` (dropping records of later steps) and, on the main rank,
        say in one line if it disagrees with the resumed checkpoint. Every rank calls it."""
        if self.ledger is None:
            return
        note = self.ledger.open(start_step, self.resumed_ledger, loader_shard_urls(self.loader))
        if note:
            print(note, file=sys.stderr)

    def recording_timeline(self, step: int) -> bool:
        """Whether `step` is one of the pipeline steps log.pp_timeline_step and log.pp_timeline_steps ask for."""
        first = self.cfg.log.pp_timeline_step
        return hasattr(self.engine, "timeline") and 0 < first <= step < first + self.cfg.log.pp_timeline_steps

    def collect_timeline(self, step: int) -> None:
        """Gather the pipeline timeline of the step just recorded; after the last recorded step (or the run's last
        step), draw the steps on the main rank and report the bubble."""
        self.engine.timeline.recording = False
        self.timeline_steps.append(self.engine.gather_timeline())
        log = self.cfg.log
        if step < min(log.pp_timeline_step + log.pp_timeline_steps - 1, self.cfg.train.steps):
            return
        if self.ctx.is_main:
            p = self.cfg.parallel
            bubble = write_timeline(self.timeline_steps, p.pp_schedule, p.microbatches, self.run_dir)
            print(
                f"pipeline timeline: {self.run_dir / 'timeline.png'}; idle fraction {bubble['measured_bubble']:.3f} "
                f"(median of {len(self.timeline_steps)} steps; theory (p-1)/(m+p-1) = "
                f"{bubble['theoretical_bubble']:.3f})",
                file=sys.stderr,
            )
        self.timeline_steps = []

    def log_memory(self) -> None:
        """Per-rank bytes of parameters, gradients and optimizer state, gathered to memory.json by the main rank."""
        per_rank = gather_to_main(self.engine.memory, self.ctx)
        if self.ctx.is_main:
            (self.run_dir / "memory.json").write_text(json.dumps(per_rank, indent=1), encoding="utf-8")
            mib = {k: v / 2**20 for k, v in per_rank[0].items()}
            print(
                f"model state on rank 0: params {mib['params']:.2f} MiB, grads {mib['grads']:.2f} MiB, "
                f"optimizer {mib['optimizer']:.2f} MiB (all ranks: {self.run_dir / 'memory.json'})",
                file=sys.stderr,
            )

    def metrics_record(self, step: int, stats, samples: int, seconds: float) -> dict[str, Any]:
        throughput = samples / seconds if seconds > 0 else 0.0
        record = {"step": step, "loss": stats.loss}
        record.update({f"loss_{name}": value for name, value in stats.parts.items()})
        record.update(
            lr=stats.lr,
            grad_norm=stats.grad_norm,
            samples_per_s=throughput,
            mfu=throughput * self.flops_per_sample / self.peak_flops,
            samples_seen=self.samples_seen,
            skipped_samples=self.loader.state_dict().get("skipped", 0),
        )
        if stats.logit_scale is not None:
            record["logit_scale"] = stats.logit_scale
        return record

    def dropout_seed(self, step: int) -> int:
        """Seed of the global RNG (dropout) for `step`: a function of (seed, step, data and pipeline rank), so a
        resumed run draws what the uninterrupted one would, and tensor-parallel ranks draw alike."""
        pp_rank = self.ctx.meshes.pp.get_local_rank() if self.ctx.meshes is not None else 0
        return ((self.cfg.train.seed * 1_000_003 + step) * 1009 + self.ctx.dp_rank) * 101 + pp_rank

    def fit(self, start_step: int = 0) -> TrainResult:
        cfg = self.cfg.train
        before = self.run_eval(step=0) if start_step == 0 else {}
        batches = iter(self.loader)
        interval_samples, interval_start = 0, time.perf_counter()
        stats = None
        checkpoint = None
        show = self.cfg.log.progress and self.ctx.is_main
        steps = range(start_step + 1, cfg.steps + 1)
        bar = tqdm(steps, desc="train", disable=not show, dynamic_ncols=True, mininterval=1.0, total=len(steps))
        self.open_ledger(start_step)
        for step in bar:
            torch.manual_seed(self.dropout_seed(step))
            timeline = self.recording_timeline(step)
            if timeline:
                self.engine.timeline.recording = True
            with self.profiler.step(step):
                batch = next(batches)
                stats = self.engine.train_step(split_microbatches(batch, cfg.grad_accum))
            if self.ledger is not None:
                self.ledger.record(step, batch["sample_id"].numpy())
            if timeline:
                self.collect_timeline(step)
            if step == start_step + 1:
                self.log_memory()
            if not math.isfinite(stats.loss):
                raise TrainingDiverged(
                    f"loss became {stats.loss} at step {step}; lower train.lr or use train.precision=fp32"
                )
            self.samples_seen += cfg.global_batch_size
            interval_samples += cfg.global_batch_size
            bar.set_postfix(loss=f"{stats.loss:.4f}", refresh=False)
            if step % self.cfg.log.every == 0 or step == cfg.steps:
                seconds = time.perf_counter() - interval_start
                self.logger.log_train(self.metrics_record(step, stats, interval_samples, seconds))
                interval_samples, interval_start = 0, time.perf_counter()
            if self.cfg.checkpoint.every and step % self.cfg.checkpoint.every == 0:
                checkpoint = self.save(step)
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                self.run_eval(step)
            self.finish_save(only_if_done=True)
            # A stop at the last step is no stop: the run ends normally below (and a requeued job need not start).
            stopped_at = self.stop_requested(step, checkpoint) if step < cfg.steps else None
            if stopped_at is not None:
                bar.close()
                self.profiler.close()
                return TrainResult(self.run_dir, stats.loss, before, {}, stopped_at, self.stopped_by)
        bar.close()
        final = step_folder(self.run_dir, cfg.steps)
        if self.cfg.checkpoint.save_final and checkpoint != final:
            checkpoint = self.save(cfg.steps)
        if self.ledger is not None and checkpoint != final:
            self.ledger.sync()  # the steps since the last checkpoint into steps.jsonl
        self.finish_save()
        after = self.run_eval(step=cfg.steps)
        final_loss = stats.loss if stats is not None else float("nan")  # nan: resumed at the last step
        return TrainResult(self.run_dir, final_loss, before, after, checkpoint)


def gather_to_main(value: Any, ctx: ParallelContext) -> list[Any]:
    """Every rank's `value` (picklable), in rank order, on the main rank; [] elsewhere. All ranks must call it."""
    if not ctx.env.distributed:
        return [value]
    gathered = [None] * ctx.env.world_size if ctx.is_main else None
    torch.distributed.gather_object(value, gathered, dst=0)
    return gathered or []


def build_ledger(cfg: Config, ctx: ParallelContext, run_dir: Path) -> Ledger:
    """This process's part of the run's sample ledger: one writer per data-parallel rank (tensor-parallel rank 0
    of pipeline stage 0; its peers hold the same samples)."""
    meshes = ctx.meshes
    writes = meshes is None or (meshes.tp.get_local_rank() == 0 and meshes.pp.get_local_rank() == 0)
    layout = Layout(1, ctx.dims.dp, microbatches_per_step(cfg), cfg.train.global_batch_size)
    return Ledger(
        run_dir / LEDGER_DIR, layout, ctx.dp_rank, writes, ctx.is_main, functools.partial(gather_to_main, ctx=ctx)
    )


def loader_shard_urls(loader) -> list[str]:
    """The shard URLs of the loader's source in global order: the streaming loader's own, an indexed loader's
    IndexedShards'; [] for the shapes source."""
    if hasattr(loader, "shard_urls"):
        return list(loader.shard_urls)
    return list(getattr(loader.dataset.source, "shard_urls", []))


def train(cfg: Config, ctx: ParallelContext | None = None) -> TrainResult:
    """Run this process's part of the training job described by `cfg` and return its result.

    Started once per process (by torchrun or another launcher, or directly for one process). Raises ConfigError
    if the layout does not match the processes started.
    """
    ctx = ctx or setup_parallel(cfg)
    configure_threads(cfg.train.threads, ctx.env.local_world_size)
    seed_everything(cfg.train.seed)
    set_deterministic(cfg.train.deterministic)
    loader = build_train_loader(cfg, dp_rank=ctx.dp_rank, dp_size=ctx.dims.dp)
    eval_loader = build_eval_loader(cfg, cfg.train.eval_batch_size)
    run_dir = prepare_run_dir(cfg) if ctx.is_main else Path(cfg.train.out_dir)
    engine = build_engine(cfg, ctx)
    logger = MetricsLogger(cfg, run_dir, config_to_dict(cfg)) if ctx.is_main else NullLogger()
    stop = StopRequest().install() if cfg.checkpoint.save_on_signal else StopRequest()
    trainer = None
    try:
        trainer = Trainer(cfg, ctx, run_dir, engine, loader, eval_loader, logger, stop)
        start = trainer.resume(cfg.checkpoint.resume) if cfg.checkpoint.resume else 0
        return trainer.fit(start)
    finally:
        if trainer is not None:
            trainer.purger.close()
            if trainer.ledger is not None:
                trainer.ledger.close()
        stop.uninstall()
        logger.close()


def format_eval(metrics: dict[str, float]) -> str:
    """A one-line summary of held-out metrics."""
    return "  ".join(f"{name} {value:.3f}" for name, value in metrics.items())


def print_result(result: TrainResult, stream=sys.stdout) -> None:
    """The end-of-run summary a user reads."""
    print(f"run directory: {result.run_dir}", file=stream)
    print(f"final training loss: {result.final_loss:.4f}", file=stream)
    if result.eval_before:
        print(f"held-out before training: {format_eval(result.eval_before)}", file=stream)
    if result.eval_after:
        print(f"held-out after training:  {format_eval(result.eval_after)}", file=stream)
    if "i2t_r1" in result.eval_before and "i2t_r1" in result.eval_after:
        before, after, chance = (
            result.eval_before["i2t_r1"],
            result.eval_after["i2t_r1"],
            result.eval_after["chance_r1"],
        )
        print(
            f"held-out image->text recall@1: {before:.3f} -> {after:.3f} "
            f"(chance {chance:.4f}; {after / chance:.0f}x chance)",
            file=stream,
        )
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}", file=stream)
    if result.stopped_by is not None:
        print(f"stopped early by {result.stopped_by}; continue with --resume auto", file=stream)
