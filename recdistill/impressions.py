"""The server's logs: the impression log (one JSON line per ranked response) and the event log
(one JSON line per click or conversion reported to ``POST /feedback``).

Each line reaches its file in a single ``write`` on a descriptor opened with ``O_APPEND``, so
lines of concurrent server processes never interleave and a killed server can leave at most
its last line torn. :func:`read_log` skips such a torn last line with a warning; a bad line
anywhere else is a ``DataFormatError`` naming the file and the line.

An event is checked against the impression log before it is appended (:class:`FeedbackLedger`):
its request must be one the servers answered (any worker: the ledger reads the shared log),
its item one that request showed, and the same event for the same item of the same request
is recorded once. The check and the append hold an exclusive lock on the event log, and the
append is flushed to disk before the event is acknowledged.
"""

from __future__ import annotations

import fcntl
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from recdistill.errors import DataFormatError

# What an event reports.
EVENTS = ("click", "conversion")
# The newest requests the ledger remembers for /feedback: about 200 bytes each.
FEEDBACK_REQUESTS = 1_000_000


class JsonLinesLog:
    """Append-only writer of a JSON-lines log at ``path`` (the impression or the event log)."""

    def __init__(self, path: Path | str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def append(self, record: dict[str, Any], *, durable: bool = False) -> None:
        """Append ``record`` as one line; ``durable``: on disk before this returns."""
        os.write(self._descriptor, orjson.dumps(record) + b"\n")
        if durable:
            os.fsync(self._descriptor)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the log's exclusive lock (against other processes appending under it)."""
        fcntl.flock(self._descriptor, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)

    def close(self) -> None:
        """Flush the log to disk and close it."""
        os.fsync(self._descriptor)
        os.close(self._descriptor)


def read_log(path: Path | str) -> list[dict[str, Any]]:
    """Every whole record of the JSON-lines log at ``path``, in the order they were written."""
    lines = Path(path).read_bytes().split(b"\n")
    # A whole log ends with a newline, so the last piece is empty unless a write was cut off.
    whole, last = lines[:-1], lines[-1]
    records = [_parse(path, number, line) for number, line in enumerate(whole, start=1)]
    if last:
        warnings.warn(
            f"{path} line {len(lines)}: torn last line ({len(last)} bytes, no newline), "
            "left by a server that was killed mid-write; skipped",
            stacklevel=2,
        )
    return records


def _parse(path: Path | str, number: int, line: bytes) -> dict[str, Any]:
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        record = None
    if not isinstance(record, dict):
        raise DataFormatError(Path(path), number, f"not a JSON record: {line[:80]!r}")
    return record


class LogTail:
    """The whole lines appended to a JSON-lines log since the last read (none while the file
    does not exist; a torn or malformed line is skipped, as no server wrote it whole)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.offset = 0

    def new_records(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as log:
                log.seek(self.offset)
                appended = log.read()
        except FileNotFoundError:
            return []
        whole = appended[: appended.rfind(b"\n") + 1]
        self.offset += len(whole)
        records = []
        for line in whole.split(b"\n"):
            try:
                record = orjson.loads(line) if line else None
            except orjson.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                records.append(record)
        return records


@dataclass(frozen=True)
class Shown:
    """What a request showed: its items, the arm that placed each (interleaved), its time."""

    items: list[Any]
    teams: list[str] | None
    arm: str
    time: float

    def placed_by(self, item: Any) -> str:
        return self.arm if self.teams is None else self.teams[self.items.index(item)]


class FeedbackLedger:
    """What ``POST /feedback`` checks an event against, and the event log it appends to.

    The requests answered are read from the impression log as it grows (the newest
    :data:`FEEDBACK_REQUESTS` kept), so an event is checked against whichever server
    process answered its request; the events recorded so far, from the event log.
    """

    def __init__(self, impressions: Path | str, events: Path | str) -> None:
        self.impressions = LogTail(impressions)
        self.events = LogTail(events)
        self.log = JsonLinesLog(events)
        self.shown: OrderedDict[str, Shown] = OrderedDict()
        self.recorded: set[tuple[str, Any, str]] = set()

    def request(self, request_id: str) -> Shown | None:
        """The request ``request_id`` as logged, or None if no server answered it."""
        if request_id not in self.shown:
            for impression in self.impressions.new_records():
                self.shown[impression["request_id"]] = Shown(
                    impression["items"],
                    impression.get("teams"),
                    impression["arm"],
                    impression["time"],
                )
                if len(self.shown) > FEEDBACK_REQUESTS:
                    self.shown.popitem(last=False)
        return self.shown.get(request_id)

    def record(self, event: dict[str, Any]) -> bool:
        """Append ``event`` durably unless the same one is recorded already (False)."""
        key = event_key(event)
        with self.log.locked():
            self.recorded.update(event_key(e) for e in self.events.new_records())
            if key in self.recorded:
                return False
            self.log.append(event, durable=True)
            self.recorded.add(key)
        return True

    def close(self) -> None:
        self.log.close()


def event_key(event: dict[str, Any]) -> tuple[str, Any, str]:
    """What makes two events the same: the request, the item and the kind of event."""
    return event["request_id"], event["item_id"], event["event"]
