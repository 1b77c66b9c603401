"""The configuration reference (docs/configuration.md), rendered from the dataclasses' field docstrings."""

from __future__ import annotations

import dataclasses
import typing

from pydantic.fields import FieldInfo

from bigmodel.config.schema import Config

HEADER = """# Configuration reference

Generated from the dataclasses in `bigmodel/config/schema.py` (a test fails when the two differ; regenerate with
`python -m bigmodel.config.reference > docs/configuration.md`). Set fields in a YAML recipe or on the command line
as `--section.key=value`. Cross-field rules (divisibility, combinations) are in `bigmodel/config/validate.py`.
"""


def _type_name(tp: typing.Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " \\| ".join(str(arg) for arg in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _default(info: FieldInfo) -> str:
    value = info.default
    return f'`"{value}"`' if isinstance(value, str) else f"`{value!r}`"


def _bounds(info: FieldInfo) -> str:
    """Range constraints as text, e.g. ">= 1, < 1.0"."""
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    parts = [f"{symbols[k]} {getattr(m, k)}" for m in info.metadata for k in symbols if hasattr(m, k)]
    return ", ".join(parts)


def render_section(cls: type, prefix: str) -> list[str]:
    """Markdown table rows for `cls`, recursing into nested sections."""
    hints = typing.get_type_hints(cls)
    docs = cls.__pydantic_fields__
    lines = [f"\n## `{prefix.rstrip('.') or 'top level'}`\n", f"{(cls.__doc__ or '').strip()}\n"]
    lines += ["| key | type | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
    nested = []
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        if dataclasses.is_dataclass(tp):
            nested.append((tp, f"{prefix}{field.name}."))
            continue
        info = docs[field.name]
        doc = " ".join((info.description or "").split())
        lines.append(f"| `{prefix}{field.name}` | {_type_name(tp)} | {_default(info)} | {_bounds(info)} | {doc} |")
    for tp, sub_prefix in nested:
        lines += render_section(tp, sub_prefix)
    return lines


def render_reference() -> str:
    """The whole reference as Markdown."""
    return HEADER + "\n".join(render_section(Config, "")) + "\n"


if __name__ == "__main__":
    print(render_reference(), end="")
