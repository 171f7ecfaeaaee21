"""What the load generator saw: request counts, exact latency percentiles and its own CPU use.

The Locust process records every request event here and writes a :class:`ClientStats` JSON
file when the test stops; the runner reads it back. Locust's own statistics round response
times to whole milliseconds below 100 ms, too coarse to compare a sub-millisecond student
with a teacher, so the percentiles are computed from the unrounded times. For statistics per
interval of a long run, :class:`TimelineRecorder` also keeps when each request finished.
"""

from __future__ import annotations

import json
import math
import time
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil


@dataclass(frozen=True)
class ClientStats:
    requests: int
    failures: int
    seconds: float
    cpu_seconds: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_share(self) -> float:
        """The load generator's CPU time over wall time: 1.0 is one core fully busy."""
        return self.cpu_seconds / self.seconds if self.seconds else 0.0

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> ClientStats:
        return cls(**json.loads(path.read_text()))


class ClientRecorder:
    """Collects response times between :meth:`start` and :meth:`stop`."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._times_ms = array("d")
        self._failures = 0
        self._started_at = 0.0
        self._cpu_at_start = 0.0

    def start(self) -> None:
        self._times_ms = array("d")
        self._failures = 0
        self._started_at = time.perf_counter()
        self._cpu_at_start = self._cpu_seconds()

    def add(self, response_time_ms: float, *, failed: bool) -> None:
        self._times_ms.append(response_time_ms)
        self._failures += failed

    def stop(self) -> ClientStats:
        seconds = time.perf_counter() - self._started_at
        cpu_seconds = self._cpu_seconds() - self._cpu_at_start
        times = sorted(self._times_ms)
        return ClientStats(
            requests=len(times),
            failures=self._failures,
            seconds=seconds,
            cpu_seconds=cpu_seconds,
            p50_ms=percentile(times, 0.50),
            p95_ms=percentile(times, 0.95),
            p99_ms=percentile(times, 0.99),
            max_ms=times[-1] if times else math.nan,
        )

    def _cpu_seconds(self) -> float:
        cpu = self._process.cpu_times()
        return cpu.user + cpu.system


def percentile(ordered: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of ascending ``ordered``; NaN when it is empty."""
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass(frozen=True)
class Timeline:
    """When each request finished (s since the epoch), its latency (ms) and whether it failed."""

    finished_at: np.ndarray
    ms: np.ndarray
    failed: np.ndarray  # bool

    def write(self, path: Path) -> None:
        rows = np.column_stack([self.finished_at, self.ms, self.failed]).astype(np.float64)
        np.save(path, rows, allow_pickle=False)

    @classmethod
    def read(cls, path: Path) -> Timeline:
        return cls.from_rows(np.load(path, allow_pickle=False))

    @classmethod
    def from_rows(cls, rows: np.ndarray) -> Timeline:
        """From ``(finished_at, ms, failed)`` rows, flattened or not."""
        rows = rows.reshape(-1, 3)
        return cls(finished_at=rows[:, 0], ms=rows[:, 1], failed=rows[:, 2] > 0)


class TimelineRecorder:
    """Records the :class:`Timeline` of the requests between :meth:`start` and :meth:`stop`."""

    def __init__(self) -> None:
        self._rows = array("d")

    def start(self) -> None:
        self._rows = array("d")

    def add(self, response_time_ms: float, *, failed: bool) -> None:
        self._rows.extend((time.time(), response_time_ms, float(failed)))

    def stop(self) -> Timeline:
        return Timeline.from_rows(np.frombuffer(self._rows, dtype=np.float64))
