"""Pieces shared by the command-line fronts: the --config option and `--section.key=value` overrides."""

from __future__ import annotations

import argparse

from bigmodel.config import Config, ConfigError, load_config

OVERRIDES_HELP = "any config field as --section.key=value, e.g. --train.steps=200 --model.fusion=merged"


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--config FILE, plus a note on overrides in the usage text."""
    parser.add_argument("--config", required=required, metavar="FILE", help="YAML recipe, e.g. configs/tiny.yaml")
    parser.epilog = f"Overrides: {OVERRIDES_HELP}. Every field is listed in docs/configuration.md."


def split_overrides(extra: list[str]) -> list[str]:
    """Turn the arguments argparse did not recognise into `--section.key=value` items.

    Accepts `--train.steps=10`, `--train.steps 10` and top-level keys with a value (`--engine=native`); anything
    else is a one-line ConfigError.
    """
    overrides, i = [], 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--") or ("." not in item.split("=", 1)[0] and "=" not in item):
            raise ConfigError(f"unrecognised argument {item!r}; config overrides look like --train.steps=100")
        if "=" not in item:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                raise ConfigError(f"override {item} has no value; write it as {item}=VALUE")
            item = f"{item}={extra[i + 1]}"
            i += 1
        overrides.append(item)
        i += 1
    return overrides


def config_from_args(args: argparse.Namespace) -> Config:
    """The validated config named by --config with the overrides collected in args.overrides."""
    return load_config(args.config, args.overrides)
