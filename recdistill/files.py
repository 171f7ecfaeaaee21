"""Writing files so that a reader never sees them half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_output_dir(out: Path) -> Iterator[Path]:
    """Yield a scratch directory that replaces ``out`` only if the block succeeds.

    On any exception the scratch directory is removed and an existing ``out`` is left
    untouched, so a failed run never leaves half-written tables behind.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    previous = out.with_name(f".{out.name}.previous")
    if out.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(out, previous)
    os.replace(scratch, out)
    shutil.rmtree(previous, ignore_errors=True)


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """``write`` a scratch file beside ``path``, then move it into place: a reader never
    sees a half-written file."""
    scratch = path.with_name(path.name + ".partial")
    write(scratch)
    os.replace(scratch, path)
