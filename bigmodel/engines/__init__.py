"""Training engines behind one interface."""

from bigmodel.engines.base import Engine, StepStats
from bigmodel.engines.native import NativeEngine, build_engine

__all__ = ["Engine", "NativeEngine", "StepStats", "build_engine"]
