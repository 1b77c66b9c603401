"""Configuration: typed sections, YAML loading with overrides, validation."""

from bigmodel.config.errors import ConfigError
from bigmodel.config.load import config_to_dict, load_config, save_config
from bigmodel.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    LogConfig,
    LossWeights,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LogConfig",
    "LossWeights",
    "ModelConfig",
    "ParallelConfig",
    "TrainConfig",
    "config_to_dict",
    "load_config",
    "save_config",
]
