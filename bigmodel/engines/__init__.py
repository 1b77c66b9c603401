"""Training engines behind one interface: "native" (the bigmodel.parallel stack, with its pipeline variant) and
"deepspeed"."""

from bigmodel.config.schema import Config
from bigmodel.engines.base import Engine, StepStats
from bigmodel.engines.native import NativeEngine
from bigmodel.parallel.context import ParallelContext

__all__ = ["Engine", "NativeEngine", "StepStats", "build_engine"]


def build_engine(cfg: Config, ctx: ParallelContext) -> Engine:
    """The engine cfg.engine names, in the layout of `ctx` (validation has refused what it cannot run)."""
    if cfg.engine == "deepspeed":
        from bigmodel.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, ctx)
    if ctx.dims.pp > 1:
        from bigmodel.engines.pipeline import PipelineEngine

        return PipelineEngine(cfg, ctx)
    return NativeEngine(cfg, ctx)
