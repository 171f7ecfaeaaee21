"""Hot reloads of a served model under load: good artifacts in turn, bad ones now and then.

The server must apply every good reload and refuse every bad one (a corrupt artifact with
422, one outside its artifact root with 403) while the model it served before keeps
serving. After each try :class:`Reloader` asks ``GET /model`` which version serves, and
records a :class:`ReloadOutcome` saying whether all of that held.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx2

from recdistill.manifest import read_manifest

GOOD, CORRUPT, OUTSIDE = "good", "corrupt", "outside"
EXPECTED_STATUS = {GOOD: 200, CORRUPT: 422, OUTSIDE: 403}
# Loading and warming up a model beside the one serving takes a while on a busy core.
RELOAD_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ReloadOutcome:
    at: float  # wall-clock time the reload was sent, s since the epoch
    kind: str  # GOOD, CORRUPT or OUTSIDE
    artifact: str
    status: int | None  # None: no answer
    serving: str | None  # the version serving afterwards; None: unknown
    problem: str | None  # how the outcome differs from the expected one; None: it does not

    @property
    def applied(self) -> bool:
        return self.kind == GOOD and self.problem is None

    @property
    def refused(self) -> bool:
        return self.kind != GOOD and self.problem is None


class Reloader:
    """Each :meth:`tick` replaces the served ``model`` with the next of ``good`` (in turn),
    and every ``bad_every`` ticks also tries ``corrupt`` and ``outside``.

    ``serving`` is the version serving before the first tick. One model must be served, so
    that ``GET /model`` lists the one version the reloads replace.
    """

    def __init__(
        self,
        client: httpx2.Client,
        model: str,
        serving: str,
        good: Sequence[Path],
        corrupt: Path,
        outside: Path,
        bad_every: int,
    ) -> None:
        self.outcomes: list[ReloadOutcome] = []
        self._client = client
        self._model = model
        self._serving = serving
        self._versions = {path: read_manifest(path).version for path in good}
        self._good = itertools.cycle(good)
        self._corrupt = corrupt
        self._outside = outside
        self._bad_every = bad_every
        self._ticks = 0

    def tick(self) -> None:
        artifact = next(self._good)
        self._try(GOOD, artifact, expected=self._versions[artifact])
        self._ticks += 1
        if self._ticks % self._bad_every == 0:
            self._try(CORRUPT, self._corrupt, expected=self._serving)
            self._try(OUTSIDE, self._outside, expected=self._serving)

    def _try(self, kind: str, artifact: Path, expected: str) -> None:
        at = time.time()
        body = {"artifact": str(artifact), "model": self._model}
        try:
            response = self._client.post("/admin/reload", json=body, timeout=RELOAD_TIMEOUT_S)
            models = self._client.get("/model").raise_for_status().json()["models"]
        except httpx2.HTTPError as error:
            self.outcomes.append(
                ReloadOutcome(at, kind, str(artifact), None, None, f"no answer: {error}")
            )
            return
        served = [model["version"] for model in models]
        problem = _problem(kind, response, served, expected, previous=self._serving)
        serving = served[0] if len(served) == 1 else None
        self.outcomes.append(
            ReloadOutcome(at, kind, str(artifact), response.status_code, serving, problem)
        )
        if serving is not None:
            self._serving = serving


def _problem(
    kind: str, response: httpx2.Response, served: list[str], expected: str, previous: str
) -> str | None:
    """How a reload's answer and the versions ``served`` after it differ from what a
    ``kind`` reload should give: ``expected`` serving, replacing ``previous`` if applied."""
    status = EXPECTED_STATUS[kind]
    if response.status_code != status:
        return f"status {response.status_code}, expected {status}: {response.text[:200]}"
    if served != [expected]:
        return f"{served} serving afterwards, expected [{expected!r}]"
    if kind == GOOD:
        answer = response.json()
        if (answer["version"], answer["previous_version"]) != (expected, previous):
            return (
                f"the answer says {answer['previous_version']} -> {answer['version']}, "
                f"expected {previous} -> {expected}"
            )
    return None
