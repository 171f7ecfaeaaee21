"""``recdistill abtest analyze``: judge live traffic from the server's logs.

The impression log (one line per request ``POST /rank`` answered: its user, arm, shown items
and, interleaved, the arm that placed each) is joined on the request ID with the clicks and
conversions reported for it, from the server's event log (``POST /feedback``) and/or the
platform's own export (CSV or Parquet with ``request_id``, ``item_id``, ``event`` and
``time`` columns). The result is the simulator's per-request log, so it is analysed and
reported exactly as a simulated experiment is, with the server's latency and the requests
per second each arm served from the log's times.

Events are checked as ``POST /feedback`` checks them: one for a request the logs do not hold,
or for an item its request did not show, is left out and counted; the same event reported
twice (the same request, item and kind, from either source) counts once.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from recdistill.ab_spec import ExperimentSpec
from recdistill.abtest.analysis import analyse
from recdistill.abtest.experiment import AbTestResult
from recdistill.abtest.report import write_report
from recdistill.abtest.simulate import EXPERIMENT
from recdistill.config import load_experiment
from recdistill.data.tables import read_meta
from recdistill.errors import DataFormatError
from recdistill.files import atomic_output_dir
from recdistill.impressions import EVENTS, event_key, read_log
from recdistill.layout import AbTestLayout, DataLayout

EVENT_COLUMNS = ("request_id", "item_id", "event", "time")
SECONDS_PER_DAY = 86_400


class DroppedEvents(UserWarning):
    """Reported events the impression log cannot place: left out of the analysis."""


def analyze_logs(
    config: Path,
    out: Path,
    *,
    impressions: Path,
    events: Path | None = None,
    events_from: Path | None = None,
    data: Path | None = None,
) -> AbTestResult:
    """Analyse the server's ``impressions`` with the events of ``events`` (its event log)
    and ``events_from`` (an export) under the experiment of ``config``; write the report to
    ``out``. User segments come from ``data`` (default: ``[simulation] data`` if set)."""
    if events is None and events_from is None:
        raise ValueError("give the events: --events (the server's log) and/or --events-from")
    experiment = load_experiment(config, live=True)
    reported = read_log(events) if events is not None else []
    if events_from is not None:
        reported += read_event_export(events_from)
    data = data if data is not None else Path(experiment.simulation.data or "")
    segments = user_segment_table(data) if str(data) not in ("", ".") else None
    log = request_log(read_log(impressions), reported, experiment, segments)
    if log.empty:
        raise ValueError(f"{impressions} holds no request served by the arms of {config}")
    columns = [] if segments is None else list(segments.columns)
    chosen = list(experiment.analysis.segments) or columns
    if set(chosen) - set(columns):
        raise ValueError(f"[analysis]: segments {chosen} are not all user segments {columns}")
    source = f"impressions {impressions}, events " + " and ".join(
        str(path) for path in (events, events_from) if path is not None
    )
    with atomic_output_dir(out) as scratch:
        layout = AbTestLayout(scratch)
        log.to_parquet(layout.requests, index=False)
        analysis = analyse(log, experiment, chosen)
        write_report(layout, experiment, analysis, "", source=source)
    return AbTestResult(experiment, analysis, log, AbTestLayout(Path(out)).report.index)


def read_event_export(path: Path) -> list[dict[str, Any]]:
    """The events of a platform's export: CSV (with a header) or Parquet, one row per event
    with ``request_id``, ``item_id``, ``event`` (click or conversion) and ``time``."""
    path = Path(path)
    if path.suffix == ".parquet":
        frame = pq.read_table(path).to_pandas()
        first_line = 0  # rows are numbered from 1
    elif path.suffix == ".csv":
        frame = pd.read_csv(path, dtype={"request_id": str, "event": str})
        first_line = 1  # the header is line 1
    else:
        raise ValueError(f"{path}: an event export is a .csv or .parquet file")
    missing = [column for column in EVENT_COLUMNS if column not in frame]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; an event export has {EVENT_COLUMNS}")
    frame = frame[list(EVENT_COLUMNS)]
    unknown = ~frame["event"].isin(EVENTS)
    if unknown.any():
        row = int(np.argmax(unknown.to_numpy()))
        raise DataFormatError(
            path, row + 1 + first_line, f"event {frame['event'].iloc[row]!r} is not one of {EVENTS}"
        )
    bad = frame["request_id"].isna() | frame["item_id"].isna()
    bad |= ~np.isfinite(pd.to_numeric(frame["time"], errors="coerce"))
    if bad.any():
        row = int(np.argmax(bad.to_numpy()))
        raise DataFormatError(
            path, row + 1 + first_line, "request_id and item_id must be given, time a number"
        )
    return [
        {**record, "item_id": _plain(record["item_id"]), "time": float(record["time"])}
        for record in frame.to_dict("records")
    ]


def _plain(value: Any) -> Any:
    """An ID as the logs hold it: numpy integers become int, whole floats (pandas reads a
    column of IDs with gaps as floats) int, strings stay strings."""
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return int(value)
    return value.item() if isinstance(value, np.generic) else value


def user_segment_table(data: Path) -> pd.DataFrame:
    """Every user's segment values (strings), by ``user_id``, from a data directory."""
    users = pq.read_table(DataLayout(data).users).to_pandas().set_index("user_id")
    return users[read_meta(data)["user_segments"]].astype(str)


def request_log(
    impressions: Sequence[dict[str, Any]],
    events: Sequence[dict[str, Any]],
    experiment: ExperimentSpec,
    segments: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The per-request log of :func:`recdistill.abtest.simulate.simulate` (all of it the
    experiment period; ``ndcg`` unknown) from a server's impressions and the events reported
    for them; users the ``segments`` table does not know are in slice ``unknown``."""
    interleaved = experiment.routing.interleaved
    arms = {arm.name for arm in experiment.routing.arms}
    served = [i for i in impressions if i["arm"] in arms or (interleaved and "teams" in i)]
    position = {i["request_id"]: {item: j for j, item in enumerate(i["items"])} for i in served}
    k = max((len(i["items"]) for i in served), default=0)
    clicks = {request_id: np.zeros(k, dtype=np.int8) for request_id in position}
    conversions = dict.fromkeys(position, 0)
    unknown, not_shown, seen = 0, 0, set()
    for event in events:
        key = event_key(event)
        if key in seen:
            continue
        seen.add(key)
        shown = position.get(event["request_id"])
        if shown is None:
            unknown += 1
        elif event["item_id"] not in shown:
            not_shown += 1
        elif event["event"] == "click":
            clicks[event["request_id"]][shown[event["item_id"]]] = 1
        else:
            conversions[event["request_id"]] += 1
    if unknown or not_shown:
        warnings.warn(
            f"left out {unknown:,} event(s) for requests the impression log does not hold "
            f"and {not_shown:,} for items their request did not show",
            DroppedEvents,
            stacklevel=2,
        )
    times = np.array([i["time"] for i in served], dtype=float)
    start = times.min() if len(times) else 0.0
    log = pd.DataFrame(
        {
            "request_id": [i["request_id"] for i in served],
            "time": times,
            "day": ((times - start) // SECONDS_PER_DAY).astype(np.int64),
            "period": EXPERIMENT,
            "user_id": [i["user_id"] for i in served],
            "arm": [i["arm"] for i in served],
            "model": [i["model"] for i in served],
            "version": [i["version"] for i in served],
            "items": [i["items"] for i in served],
            "clicks": [clicks[i["request_id"]][: len(i["items"])] for i in served],
            **({"teams": [i["teams"] for i in served]} if interleaved else {}),
            "n_shown": [len(i["items"]) for i in served],
            "n_conversions": [conversions[i["request_id"]] for i in served],
            "ndcg": np.nan,
            "latency_ms": [i.get("latency_ms", np.nan) for i in served],
            "round_trip_ms": np.nan,
        }
    )
    log.insert(log.columns.get_loc("n_shown") + 1, "n_clicks", log["clicks"].map(np.sum))
    if segments is not None:
        known = segments.reindex(log["user_id"]).fillna("unknown").reset_index(drop=True)
        log = pd.concat([log, known], axis=1)
    return log
