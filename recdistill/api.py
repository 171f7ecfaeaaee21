"""The Python API: from a DataFrame of interactions to a distilled student ranking items.

Every name here is also at the package top level, and the CLI is a thin layer over the same
calls::

    import recdistill

    data = recdistill.prepare_data(events, "data/shop", user="visitor", item="sku", time="ts")
    config = recdistill.load_run_config("configs/default.toml")
    summary = recdistill.train(config, data, "runs/shop")
    recdistill.report("runs/shop")
    ranker = recdistill.load_ranker(recdistill.export("runs/shop", "student", "artifacts/shop"))
    ranker.rank("v17", ["sku-1", "sku-9", "sku-4"], k=2)  # [("sku-9", 1.3), ("sku-4", 0.2)]
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recdistill.config import RunConfig, load_run_config
from recdistill.data.ids import require_id_kind
from recdistill.data.importer import (
    ImportSpec,
    InteractionColumns,
    ItemTable,
    TextFormat,
    UserTable,
    import_interactions,
)
from recdistill.data.prepare import SplitSpec, prepare
from recdistill.data.tables import write_raw
from recdistill.files import atomic_output_dir
from recdistill.summary import RunSummary


def prepare_data(
    interactions: pd.DataFrame | Path | str,
    out: Path | str,
    *,
    user: str = "user_id",
    item: str = "item_id",
    time: str = "timestamp",
    rating: str | None = None,
    min_rating: float | None = None,
    time_unit: str = "auto",
    users: UserTable | None = None,
    items: ItemTable | None = None,
    k_core: int = 1,
    split: SplitSpec | None = None,
    encoding: str = "utf-8",
    delimiter: str = ",",
    force: bool = False,
    log: Callable[[str], Any] = print,
) -> Path:
    """Write data directory ``out`` from an interaction log (a DataFrame, or a CSV, Parquet
    or JSON Lines file) with the columns named; text files are read in ``encoding``, a CSV's
    fields split on ``delimiter``. ``log`` gets the rows read, one line per rule that dropped
    something and the pairs kept (docs/data.md, "Your own data"). An existing ``out`` is
    replaced only when ``force``; nothing is left behind if it fails."""
    if Path(out).exists() and not force:
        raise ValueError(f"{out} already exists: pass --force (force=True) to replace it")
    columns = InteractionColumns(user, item, time, rating, min_rating, time_unit)
    text = TextFormat(encoding, delimiter)
    imported = import_interactions(interactions, ImportSpec(columns, users, items, k_core, text))
    for note in imported.notes:
        log(note)
    with atomic_output_dir(Path(out)) as scratch:
        write_raw(scratch, imported.raw)
        prepare(scratch, split or SplitSpec())
    return Path(out)


def train(
    config: RunConfig | Path | str,
    data: Path | str,
    out: Path | str,
    *,
    resume: bool = False,
    teachers: dict[str, Any] | None = None,
    device: str | None = None,
) -> RunSummary:
    """Train every stage of ``config`` (a :class:`RunConfig` or a TOML file) on ``data`` into
    run directory ``out``; returns what ``summary.json`` holds. ``teachers`` hands over the
    teachers the config's ``[teachers.NAME]`` tables say come from Python: a torch module of
    the tensor form (``kind = "torch"``) or any object meeting the teacher contract
    (``kind = "python"``; :class:`recdistill.external.TeacherModel`). Every model, teacher and
    batch is on ``device`` (``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; None: the
    ``RECDISTILL_DEVICE`` environment variable, else ``"auto"``), printed as training starts."""
    from recdistill import devices
    from recdistill.pipeline import run

    devices.use(device)
    if not isinstance(config, RunConfig):
        config = load_run_config(Path(config))
    return run(config, Path(data), Path(out), resume=resume, teachers=teachers)


def report(
    run: Path | str, *, min_users: int | None = None, retention_threshold: float | None = None
) -> Path:
    """Write the segment-level report of run directory ``run``; returns its HTML page."""
    from recdistill.evaluation_report import build_report
    from recdistill.segments import SliceSpec

    changes = {"min_users": min_users, "retention_threshold": retention_threshold}
    spec = SliceSpec(**{name: value for name, value in changes.items() if value is not None})
    return build_report(Path(run), spec)


def export(
    run: Path | str,
    model: str,
    out: Path | str,
    *,
    data: Path | str | None = None,
    format: str = "artifact",
) -> Path:
    """Write ``model`` of run ``run`` to ``out``: its serving artifact, or (``format="onnx"``)
    the model as an ONNX graph of the teacher contract's tensor form with its vocabularies
    (``recdistill.onnx_export``); returns ``out``."""
    from recdistill.artifact import export_artifact

    data = None if data is None else Path(data)
    if format == "artifact":
        export_artifact(Path(run), model, Path(out), data=data)
        return Path(out)
    if format != "onnx":
        raise ValueError(f"unknown export format {format!r}; choose artifact or onnx")
    from recdistill.artifact import load_artifact
    from recdistill.online import OnlineRanker
    from recdistill.onnx_export import export_onnx

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as scratch:
        artifact = Path(scratch) / "artifact"
        export_artifact(Path(run), model, artifact, data=data)
        export_onnx(OnlineRanker(load_artifact(artifact)), out, model)
    return out


@dataclass
class Ranker:
    """An exported model ranking candidates for one user at a time, as ``POST /rank`` does,
    with the IDs the data has (integers or strings)."""

    online: Any  # recdistill.online.OnlineRanker

    @property
    def name(self) -> str:
        return self.online.name

    def rank(
        self,
        user: Any,
        candidates: Sequence[Any],
        *,
        k: int | None = None,
        recent_items: Sequence[Any] = (),
    ) -> list[tuple[Any, float]]:
        """``(item, score)`` of ``candidates`` for ``user``, best first, the top ``k`` (all
        when None); ``recent_items`` are the user's latest items, most recent first. IDs
        must be of the kind the model's data has (strings or integers), as ``POST /rank``
        requires: a ``ValueError`` says so."""
        store = self.online.store
        require_id_kind([user], store.user_ids, "user_id", self.name)
        require_id_kind([*candidates, *recent_items], store.item_ids, "item IDs", self.name)
        ranking = self.online.rank(user, np.asarray(candidates), np.asarray(recent_items))
        top = slice(None, k)
        return list(zip(ranking.items[top].tolist(), ranking.scores[top].tolist()))


def load_ranker(artifact: Path | str) -> Ranker:
    """The ranker of an artifact that :func:`export` (or ``recdistill export``) wrote."""
    from recdistill.artifact import load_artifact
    from recdistill.online import OnlineRanker

    return Ranker(OnlineRanker(load_artifact(Path(artifact)), precompute_items=True))
