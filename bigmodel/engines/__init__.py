"""Training engines behind one interface."""

from bigmodel.config.schema import Config
from bigmodel.engines.base import Engine, StepStats
from bigmodel.engines.native import NativeEngine
from bigmodel.engines.native import build_engine as build_native_engine
from bigmodel.parallel.context import ParallelContext

__all__ = ["Engine", "NativeEngine", "StepStats", "build_engine"]


def build_engine(cfg: Config, ctx: ParallelContext) -> Engine:
    """The engine cfg.engine names, in the layout of `ctx` (validation has refused what it cannot run)."""
    if cfg.engine == "deepspeed":
        from bigmodel.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, ctx)
    return build_native_engine(cfg, ctx)
