"""The impression log: one JSON line per ranked response.

Each line reaches the file in a single ``write`` on a descriptor opened with ``O_APPEND``, so
lines of concurrent server processes never interleave and a killed server can leave at most
its last line torn. ``read_impressions`` skips such a torn last line with a warning; a bad
line anywhere else is a ``DataFormatError`` naming the file and the line.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import orjson

from recdistill.errors import DataFormatError


class ImpressionLog:
    """Append-only writer of the impression log at ``path``."""

    def __init__(self, path: Path | str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def append(self, impression: dict[str, Any]) -> None:
        os.write(self._descriptor, orjson.dumps(impression) + b"\n")

    def close(self) -> None:
        """Flush the log to disk and close it."""
        os.fsync(self._descriptor)
        os.close(self._descriptor)


def read_impressions(path: Path | str) -> list[dict[str, Any]]:
    """Every whole impression of the log at ``path``, in the order they were written."""
    lines = Path(path).read_bytes().split(b"\n")
    # A whole log ends with a newline, so the last piece is empty unless a write was cut off.
    whole, last = lines[:-1], lines[-1]
    impressions = [_parse(path, number, line) for number, line in enumerate(whole, start=1)]
    if last:
        warnings.warn(
            f"{path} line {len(lines)}: torn last line ({len(last)} bytes, no newline), "
            "left by a server that was killed mid-write; skipped",
            stacklevel=2,
        )
    return impressions


def _parse(path: Path | str, number: int, line: bytes) -> dict[str, Any]:
    try:
        impression = orjson.loads(line)
    except orjson.JSONDecodeError:
        impression = None
    if not isinstance(impression, dict):
        raise DataFormatError(Path(path), number, f"not a JSON impression: {line[:80]!r}")
    return impression
