"""TOML text from plain tables: what ``tomllib`` reads, written back (it has no writer)."""

from __future__ import annotations

import json
import math
import re
from typing import Any


def dumps(tables: dict[tuple[str, ...], dict[str, Any]]) -> str:
    return "\n".join(
        f"[{'.'.join(_key(k) for k in header)}]\n"
        + "".join(f"{_key(k)} = {_value(v)}\n" for k, v in values.items())
        for header, values in tables.items()
    )


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} to TOML")
