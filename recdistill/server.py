"""Starting a ranking server: its settings, the environment variable that carries them to the
app, the graceful-shutdown time, and ``recdistill serve`` run as a ready child process.

``recdistill serve`` starts uvicorn on ``serving.app:app_from_environment``, named by its
import string, with the settings as JSON in ``SETTINGS_ENV``; that string is the one place
the library reaches the ``serving`` package, which it never imports. The load test, the
online A/B simulation and the tests run a real server on a free port with
:func:`running_server`. Importing this module loads neither torch nor httpx2, so the CLI
reads its defaults fast.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from recdistill.layout import ServeLayout

if TYPE_CHECKING:
    from recdistill.routing import Routing

SETTINGS_ENV = "RECDISTILL_SERVE_SETTINGS"
# How one request's user tower runs (recdistill.online): "plain" reads the trained weights
# without jagged tensors; "torchrec" runs the modules training uses, for comparison.
INFERENCE_PATHS = ("plain", "torchrec")
# Known users' vectors an OnlineRanker keeps for requests without recent_items.
USER_CACHE = 100_000
READY_TIMEOUT_S = 120.0
# On SIGTERM, how long the requests in flight may take to finish before they are dropped.
GRACEFUL_SHUTDOWN_S = 30


@dataclass(frozen=True)
class ServerSettings:
    artifacts: tuple[str, ...]
    ab_config: str | None = None
    # Relative paths are the working directory's; ``recdistill serve`` resolves it.
    impressions: str = str(ServeLayout().impressions)
    # POST /feedback's event log; unset: events.jsonl beside the impression log.
    events: str | None = None
    max_candidates: int = 1000
    max_body_bytes: int = 64 * 1024
    threads: int = 1
    precompute_items: bool = True
    inference: str = INFERENCE_PATHS[0]
    user_cache: int = USER_CACHE
    artifact_root: str | None = None

    def __post_init__(self) -> None:
        if self.inference not in INFERENCE_PATHS:
            raise ValueError(f"inference must be one of {INFERENCE_PATHS}, not {self.inference!r}")
        for name in ("max_candidates", "max_body_bytes", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.user_cache < 0:
            raise ValueError(f"user_cache must be 0 (none) or more, not {self.user_cache}")

    @property
    def event_log(self) -> Path:
        if self.events is not None:
            return Path(self.events)
        return Path(self.impressions).with_name(Path(ServeLayout().events).name)

    def reload_root(self) -> Path:
        """The directory reloads may load from: ``artifact_root``, or by default the
        common parent directory of the served artifacts (symlinks and ``..`` resolved)."""
        if self.artifact_root is not None:
            return Path(self.artifact_root).resolve()
        return Path(os.path.commonpath([Path(a).resolve().parent for a in self.artifacts]))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServerSettings:
        values = json.loads(text)
        return cls(**{**values, "artifacts": tuple(values["artifacts"])})


@dataclass(frozen=True)
class ServerProcess:
    """A ready ``recdistill serve`` child process and its base URL."""

    url: str
    process: subprocess.Popen


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_server(
    artifacts: Sequence[Path | str],
    *,
    ab_config: Path | str | None = None,
    impressions: Path | str,
    events: Path | str | None = None,
    extra_args: Sequence[str] = (),
    cpus: set[int] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[ServerProcess]:
    """Yield a ready server; stop it on exit (SIGTERM, then SIGKILL if it hangs). Its
    ``POST /feedback`` events go to ``events``, by default beside ``impressions``.

    ``cpus`` pins the server process to those cores (Linux), so a load generator on the
    other core does not compete with it. A server that exits or is not ready within
    ``READY_TIMEOUT_S`` raises ``RuntimeError`` with the tail of its output.
    """
    port = free_port()
    command = [sys.executable, "-m", "recdistill.cli", "serve", "--port", str(port)]
    for artifact in artifacts:
        command += ["--artifact", str(artifact)]
    if ab_config is not None:
        command += ["--ab", str(ab_config)]
    command += ["--impressions", str(impressions), *extra_args]
    if events is not None:
        command += ["--events", str(events)]
    log_path = Path(impressions).with_name(f"server-{port}.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    if cpus:
        # Set before the interpreter starts any thread, so all of them inherit it.
        os.sched_setaffinity(process.pid, cpus)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, log_path)
        yield ServerProcess(url, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=GRACEFUL_SHUTDOWN_S + 5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(url: str, process: subprocess.Popen, log_path: Path) -> None:
    # Imported here rather than at the top: it would more than double the CLI's start-up time.
    import httpx2

    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"the server exited with code {process.returncode}:\n{_tail(log_path)}"
            )
        try:
            if httpx2.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx2.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(
        f"the server was not ready within {READY_TIMEOUT_S:.0f} s:\n{_tail(log_path)}"
    )


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def routing_for(settings: ServerSettings, models: set[str]) -> Routing:
    """The A/B routing of ``settings`` over the served ``models``, checked against them."""
    from recdistill.config import load_routing
    from recdistill.routing import Routing

    if settings.ab_config is None:
        if len(models) > 1:
            raise ValueError("several artifacts need an A/B config (--ab) to route between them")
        return Routing.single(next(iter(models)))
    routing = load_routing(Path(settings.ab_config))
    unknown = sorted({arm.model for arm in routing.arms} - models)
    if unknown:
        raise ValueError(f"A/B arms use {unknown}, which no --artifact provides ({sorted(models)})")
    return routing
