"""Loading a run's configuration: YAML file, then `--section.key=value` overrides, then validation.

Every problem is raised as one `ConfigError` whose message is a single line naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from bigmodel.config.errors import ConfigError
from bigmodel.config.schema import Config
from bigmodel.config.validate import validate_config


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read `path` (YAML; None means all defaults), apply `overrides` and validate.

    `overrides` are command-line items such as `--train.steps=10` or `train.steps=10`. Raises ConfigError.
    """
    raw = read_yaml(path) if path is not None else {}
    for item in overrides:
        dotted, value = parse_override(item)
        set_dotted(raw, dotted, value)
    return config_from_dict(raw)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The YAML mapping in `path`, or ConfigError if it is missing, unreadable or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file, e.g. configs/tiny.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}; fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model:, train:, ...)")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """Split `--section.key=value` into ("section.key", value); the value is read as a YAML scalar."""
    text = item[2:] if item.startswith("--") else item
    if "=" not in text or not text.split("=", 1)[0]:
        raise ConfigError(f"override {item!r} is not of the form --section.key=value, e.g. --train.steps=100")
    dotted, value_text = text.split("=", 1)
    try:
        value = yaml.safe_load(value_text) if value_text != "" else ""
    except yaml.YAMLError:
        value = value_text
    return dotted, value


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `tree["a"]["b"] = value` for dotted "a.b", creating sections on the way."""
    *parents, leaf = dotted.split(".")
    node = tree
    for i, name in enumerate(parents):
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            section = ".".join(parents[: i + 1])
            raise ConfigError(f"{section} is a value, not a section, so {dotted} cannot be set; override {section}")
        node = child
    node[leaf] = value


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from nested dicts (as read from YAML)."""
    check_known_keys(raw, Config, prefix="")
    try:
        cfg = Config(**raw)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err)) from None
    except TypeError as err:  # a section given as a scalar, e.g. `model: 3`
        raise ConfigError(f"{err}; each section must be a mapping of keys") from None
    validate_config(cfg)
    return cfg


def check_known_keys(raw: Any, cls: type, prefix: str) -> None:
    """Raise ConfigError for the first key of `raw` that `cls` does not define, with a did-you-mean."""
    if not isinstance(raw, dict):
        where = prefix.rstrip(".") or "the config"
        raise ConfigError(f"{where} must be a mapping of keys, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {prefix}{key}; {hint}")
        field_type = hints[key]
        if dataclasses.is_dataclass(field_type):
            check_known_keys(value, field_type, prefix=f"{prefix}{key}.")


def describe_validation_error(err: ValidationError) -> str:
    """One line for the first error pydantic found: the dotted field, the bad value and what is allowed."""
    first = err.errors()[0]
    field = ".".join(str(part) for part in first["loc"])
    value = first.get("input")
    message = first["msg"]
    allowed = message[0].lower() + message[1:]
    allowed = allowed.replace("input should be", "it should be")
    return f"{field}={value!r} is invalid: {allowed}; set {field} to a valid value"


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain nested dicts, ready for YAML or JSON."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with load_config)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
