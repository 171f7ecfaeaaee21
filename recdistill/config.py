"""TOML configs mapped onto the dataclass specs that build everything."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from recdistill.layout import DEFAULT_HISTORY_LENGTH

Spec = TypeVar("Spec")
# The [train] key that shapes the features rather than a stage.
HISTORY_LENGTH = "history_length"


def load_config(path: Path | None) -> dict[str, Any]:
    """The parsed TOML at ``path``, or an empty config when no path is given."""
    if path is None:
        return {}
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config {path} not found")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"config {path}: {error}") from error


def section(config: dict[str, Any], dotted: str) -> dict[str, Any]:
    """The table at ``dotted`` (e.g. ``"data.split"``), empty when absent."""
    table: Any = config
    for key in dotted.split("."):
        table = table.get(key, {}) if isinstance(table, dict) else {}
    return table


def history_length(config: dict[str, Any]) -> int:
    """Items of history the features of a run of ``config`` hold."""
    return section(config, "train").get(HISTORY_LENGTH, DEFAULT_HISTORY_LENGTH)


def spec_from(cls: type[Spec], table: dict[str, Any], where: str, **overrides: Any) -> Spec:
    """Build the dataclass ``cls`` from a config table; ``overrides`` that are not None win.

    Unknown keys are an error that names ``where`` (e.g. ``"[data.split]"``) and the valid keys.
    """
    names = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {names}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)
