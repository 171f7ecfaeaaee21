"""The real-time ranking service: FastAPI over one or more exported artifacts.

``POST /rank`` routes the user to an A/B arm (``recdistill.routing``), ranks the candidates
with that arm's model (``recdistill.online``), appends the response to the impression log
and returns it; under an interleaving design it ranks with both arms' models and shows their
team-draft merge (``recdistill.interleaving``), the impression naming the arm that placed
each item. ``POST /feedback`` takes a click or conversion on an item a request showed and
appends it to the event log once (``recdistill.impressions.FeedbackLedger``). Models are loaded and warmed up in the lifespan hook; ``/readyz`` answers
200 only after that. ``POST /admin/reload`` swaps one model for a newly loaded artifact from
inside the artifact root; if loading fails for any reason the old model keeps serving. Admin
requests are authenticated before anything reads their body.

Every error is ``{"detail": ...}`` with a status below 500: a message, or for a body that does
not fit the schema, one entry per offending field (non-finite numbers, which Python's JSON
parser accepts, are named as such). On shutdown uvicorn stops accepting, finishes the requests
in flight, and the lifespan hook then flushes and closes the impression log.

The ranking endpoint is ``async`` and runs the model inline on the event loop: a request
costs well under a millisecond of CPU and torch runs one thread per worker, so a thread pool
would only add hand-offs.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from recdistill.artifact import load_artifact
from recdistill.data.ids import require_id_kind
from recdistill.impressions import FeedbackLedger, JsonLinesLog
from recdistill.interleaving import INTERLEAVED, team_draft
from recdistill.online import OnlineRanker, Ranking
from recdistill.routing import Arm, Routing
from recdistill.server import SETTINGS_ENV, ServerSettings, routing_for
from serving.api_docs import add_api_docs
from serving.middleware import AdminAuth, BodySizeLimit, RequestCounter
from serving.schemas import (
    FeedbackRequest,
    FeedbackResponse,
    RankRequest,
    RankResponse,
    Readiness,
    ReloadRequest,
    ReloadResponse,
    error_responses,
    invalid_request,
)

# Fine at the low end, where a healthy student lives, so p99 can be read off the histogram.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075,
    0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
WARM_UP_ROUNDS = 5
# A reload builds its model on a second thread, partly in Python. Each time /rank gives up
# the GIL (every torch op) it may wait this long to get it back, so Python's 5 ms default
# adds up over the dozens of ops of a request. In a soak at 420 RPS with the demo teacher
# reloaded every 10 s, p99 was 32 ms with 5 ms and 14 ms with 0.5 ms.
GIL_SWITCH_INTERVAL_S = 0.0005
RELOAD_NICENESS = 10


@dataclass
class ServiceState:
    settings: ServerSettings
    routing: Routing | None = None
    rankers: dict[str, OnlineRanker] = field(default_factory=dict)
    ready: bool = False
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Reloads build their model on one thread that yields the CPU to requests.
    loader: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, "reload", initializer=_yield_the_cpu)
    )
    impressions: JsonLinesLog | None = None
    feedback: FeedbackLedger | None = None
    # The coins of team-draft interleaving.
    coins: np.random.Generator = field(default_factory=np.random.default_rng)


class Telemetry:
    """The Prometheus metrics of one app (its own registry, so apps never collide)."""

    def __init__(self, rankers: Callable[[], dict[str, OnlineRanker]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(UserCacheMetrics(rankers))
        self.requests = Counter(
            "recdistill_http_requests",
            "HTTP requests by route and status code.",
            ["route", "status"],
            registry=self.registry,
        )
        self.rank_latency = Histogram(
            "recdistill_rank_latency_seconds",
            "Server-side /rank latency, from request received to response ready.",
            ["model", "arm"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.model_info = Gauge(
            "recdistill_model_info",
            "1 for the model version each name currently serves.",
            ["model", "version"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "recdistill_reloads",
            "Model reloads by outcome.",
            ["model", "outcome"],
            registry=self.registry,
        )

    def serving(self, ranker: OnlineRanker, previous: OnlineRanker | None = None) -> None:
        if previous is not None:
            self.model_info.remove(previous.name, previous.version)
        self.model_info.labels(ranker.name, ranker.version).set(1)


class UserCacheMetrics:
    """Each served model version's user-vector cache, read when ``/metrics`` is scraped (a
    reload starts a new cache, so the counts restart with the new version)."""

    def __init__(self, rankers: Callable[[], dict[str, OnlineRanker]]) -> None:
        self.rankers = rankers

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        lookups = CounterMetricFamily(
            "recdistill_user_vector_cache_lookups",
            "User-vector cache lookups (known users, no recent_items) by outcome.",
            labels=[*labels, "outcome"],
        )
        hit_ratio = GaugeMetricFamily(
            "recdistill_user_vector_cache_hit_ratio",
            "Share of the cache's lookups that found the user's vector.",
            labels=labels,
        )
        users = GaugeMetricFamily(
            "recdistill_user_vector_cache_users", "User vectors held.", labels=labels
        )
        for ranker in self.rankers().values():
            cache, model = ranker.user_cache, [ranker.name, ranker.version]
            lookups.add_metric([*model, "hit"], cache.hits)
            lookups.add_metric([*model, "miss"], cache.misses)
            hit_ratio.add_metric(model, cache.hits / max(1, cache.hits + cache.misses))
            users.add_metric(model, len(cache.vectors))
        yield from (lookups, hit_ratio, users)


def create_app(settings: ServerSettings) -> FastAPI:
    state = ServiceState(settings)
    telemetry = Telemetry(lambda: state.rankers)
    reload_root = settings.reload_root()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threads, switch_interval = torch.get_num_threads(), sys.getswitchinterval()
        torch.set_num_threads(settings.threads)
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        rankers = await run_in_threadpool(_load_all, settings)
        state.routing = routing_for(settings, set(rankers))
        state.rankers = rankers
        for ranker in rankers.values():
            telemetry.serving(ranker)
        state.impressions = JsonLinesLog(settings.impressions)
        state.feedback = FeedbackLedger(settings.impressions, settings.event_log)
        state.ready = True
        try:
            yield
        finally:
            state.ready = False
            state.impressions.close()
            state.feedback.close()
            torch.set_num_threads(threads)
            sys.setswitchinterval(switch_interval)
            state.loader.shutdown()

    app = FastAPI(
        title="recdistill ranker",
        summary="Ranks candidate items for a user with a distilled recommender model.",
        lifespan=lifespan,
        exception_handlers={RequestValidationError: invalid_request},
        docs_url=None,  # served from local assets instead of a CDN: serving.api_docs
        redoc_url=None,
    )
    add_api_docs(app)
    # The last added runs first: count every response, then authenticate, then read bodies.
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    app.add_middleware(AdminAuth)
    app.add_middleware(RequestCounter, requests=telemetry.requests)

    @app.post("/rank", response_model=RankResponse, responses=error_responses(400, 413, 422, 503))
    async def rank(body: RankRequest, request: Request) -> Response:
        """Rank ``candidates`` for ``user_id``; the top ``k`` (all if not given), best first."""
        if not state.ready:
            raise HTTPException(503, "models are still loading")
        if len(body.candidates) > settings.max_candidates:
            raise HTTPException(
                422, f"{len(body.candidates)} candidates; at most {settings.max_candidates}"
            )
        routing = state.routing
        arms = routing.arms if routing.interleaved else (routing.arm_of(body.user_id),)
        rankers = [state.rankers[arm.model] for arm in arms]
        rankings = []
        for ranker in rankers:
            _require_id_kinds(body, ranker)
            rankings.append(
                ranker.rank(
                    body.user_id, np.asarray(body.candidates), np.asarray(body.recent_items)
                )
            )
        if routing.interleaved:
            items, scores, teams = _interleave(body, arms, rankings, state.coins)
            arm = INTERLEAVED
        else:
            shown = slice(0, body.k)
            items, scores = rankings[0].items[shown].tolist(), rankings[0].scores[shown].tolist()
            teams, arm = None, arms[0].name
        model = "+".join(ranker.name for ranker in rankers)
        version = "+".join(ranker.version for ranker in rankers)
        cold_start = any(ranking.cold_start for ranking in rankings)
        unknown = list(dict.fromkeys(i for ranking in rankings for i in ranking.unknown.tolist()))
        request_id = uuid.uuid4().hex
        payload = {
            "request_id": request_id,
            "model": model,
            "version": version,
            "arm": arm,
            "cold_start": cold_start,
            "unknown_items": unknown,
            "items": [{"item_id": i, "score": s} for i, s in zip(items, scores)],
        }
        content = orjson.dumps(payload)
        latency = time.perf_counter() - request.state.received_at
        telemetry.rank_latency.labels(model, arm).observe(latency)
        impression = {
            "request_id": request_id,
            "time": time.time(),
            "user_id": body.user_id,
            "arm": arm,
            "model": model,
            "version": version,
            "n_candidates": len(body.candidates),
            "items": items,
            **({} if teams is None else {"teams": teams}),
            "cold_start": cold_start,
            "latency_ms": latency * 1000,
        }
        state.impressions.append(impression)
        return Response(content, media_type="application/json")

    @app.post(
        "/feedback",
        response_model=FeedbackResponse,
        responses=error_responses(400, 404, 409, 413, 422, 503),
    )
    async def feedback(body: FeedbackRequest) -> dict[str, Any]:
        """Record a click or conversion on an item a ranked request showed: 404 for a request
        this server never answered, 422 for an item it did not show, 409 for an event
        already recorded (it is counted once), 400 for a body that is not JSON, 413 for one
        over the size limit. Appended to the event log, on disk before the
        answer."""
        if not state.ready:
            raise HTTPException(503, "models are still loading")
        shown = state.feedback.request(body.request_id)
        if shown is None:
            raise HTTPException(404, f"no ranked request has request_id {body.request_id!r}")
        if body.item_id not in shown.items:
            raise HTTPException(
                422, f"request {body.request_id} did not show item {body.item_id!r}"
            )
        received = time.time()
        if body.time is not None and body.time < shown.time:
            raise HTTPException(
                422,
                f"time {body.time} is before request {body.request_id} was answered ({shown.time})",
            )
        arm = shown.placed_by(body.item_id)
        event = {
            "request_id": body.request_id,
            "item_id": body.item_id,
            "event": body.event,
            "time": received if body.time is None else body.time,
            "received": received,
            "arm": arm,
        }
        if not state.feedback.record(event):
            raise HTTPException(
                409,
                f"a {body.event} on item {body.item_id!r} of request {body.request_id} is "
                "already recorded; it counts once",
            )
        return {
            "request_id": body.request_id,
            "item_id": body.item_id,
            "event": body.event,
            "arm": arm,
        }

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
    async def readyz() -> JSONResponse:
        """200 once every model is loaded and warmed up, 503 before."""
        body = {"ready": state.ready, "models": {n: r.version for n, r in state.rankers.items()}}
        return JSONResponse(body, status_code=200 if state.ready else 503)

    @app.get("/model")
    async def model() -> dict[str, Any]:
        """The served models (name, version, params), the A/B arms routing to them and the
        torch threads each request runs on."""
        routing = state.routing
        return {
            "models": [ranker.artifact.describe() for ranker in state.rankers.values()],
            "torch_threads": torch.get_num_threads(),
            "routing": None if routing is None else {
                "salt": routing.salt,
                "arms": [asdict(arm) for arm in routing.arms],
            },
        }  # fmt: skip

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        """Prometheus metrics: request counts, /rank latency histogram per model and arm."""
        return Response(generate_latest(telemetry.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/admin/reload",
        response_model=ReloadResponse,
        responses=error_responses(400, 401, 403, 409, 413, 422),
    )
    async def reload(body: ReloadRequest) -> dict[str, Any]:
        """Swap a served model for the artifact at ``artifact``; needs the admin token
        (``Authorization: Bearer <token>``) and an artifact inside the artifact root.

        The new model is loaded and warmed up beside the old one, then swapped in; if that
        fails the old model keeps serving and the response says why.
        """
        directory = _inside(reload_root, body.artifact)
        if directory is None:
            telemetry.reloads.labels(body.model or "", "refused").inc()
            raise HTTPException(
                403, f"{body.artifact!r} is outside the artifact root {reload_root}"
            )
        async with state.reload_lock:
            try:
                ranker = await asyncio.get_running_loop().run_in_executor(
                    state.loader, _load_ranker, directory, settings
                )
            except Exception as error:
                name = body.model or "the model"
                telemetry.reloads.labels(body.model or "", "failed").inc()
                raise HTTPException(
                    422, f"reload failed, {name} keeps serving its current version: {error}"
                ) from error
            name = body.model or ranker.name
            if name not in state.rankers:
                telemetry.reloads.labels(name, "failed").inc()
                raise HTTPException(
                    409, f"no served model is named {name!r}; served: {sorted(state.rankers)}"
                )
            previous = state.rankers[name]
            state.rankers = {**state.rankers, name: ranker}
            telemetry.serving(ranker, previous)
            telemetry.reloads.labels(name, "succeeded").inc()
        return {"model": name, "version": ranker.version, "previous_version": previous.version}

    return app


def app_from_environment() -> FastAPI:
    """The app for ``uvicorn --factory``, with settings from ``RECDISTILL_SERVE_SETTINGS``."""
    return create_app(ServerSettings.from_json(os.environ[SETTINGS_ENV]))


def _inside(root: Path, artifact: str) -> Path | None:
    """``artifact`` with symlinks and ``..`` resolved, or None if that is outside ``root``."""
    try:
        resolved = Path(artifact).resolve()
    except (OSError, ValueError):  # a NUL byte, a symlink loop
        return None
    return resolved if resolved.is_relative_to(root) else None


def _return_freed_memory() -> None:
    """Hand back to the OS the pages that models dropped by earlier reloads freed. glibc keeps
    them otherwise, and a server reloading every 5 s grew its resident memory floor by 24 %
    over a 10-minute soak; with this it stays flat."""
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):  # glibc only
        libc.malloc_trim(0)


def _yield_the_cpu() -> None:
    """A low CPU priority for the calling thread (Linux sets it per thread), so the work of a
    reload takes mostly the time requests leave over instead of queueing them. Nice 10 (a
    tenth of a normal thread's share) rather than 19, so that on a saturated core a reload
    still finishes in seconds rather than minutes."""
    if sys.platform == "linux":
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), RELOAD_NICENESS)


def _load_ranker(directory: Path | str, settings: ServerSettings) -> OnlineRanker:
    _return_freed_memory()
    ranker = OnlineRanker(
        load_artifact(Path(directory)),
        precompute_items=settings.precompute_items,
        inference=settings.inference,
        user_cache=settings.user_cache,
    )
    _warm_up(ranker, settings.max_candidates)
    return ranker


def _load_all(settings: ServerSettings) -> dict[str, OnlineRanker]:
    rankers: dict[str, OnlineRanker] = {}
    for directory in settings.artifacts:
        ranker = _load_ranker(directory, settings)
        if ranker.name in rankers:
            raise ValueError(f"two artifacts are both named {ranker.name!r}")
        rankers[ranker.name] = ranker
    return rankers


def _interleave(
    body: RankRequest, arms: tuple[Arm, ...], rankings: list[Ranking], coins: np.random.Generator
) -> tuple[list[Any], list[float], list[str]]:
    """The team-draft slate of the two rankings: items, each one's score from the arm that
    placed it, and that arm."""
    k = min(body.k or len(body.candidates), len(body.candidates))
    column = {item: index for index, item in enumerate(body.candidates)}
    first, second = (
        np.array([[column[item] for item in ranking.items[:k].tolist()]]) for ranking in rankings
    )
    shown, teams = team_draft(first, second, k, coins)
    score = [dict(zip(r.items[:k].tolist(), r.scores[:k].tolist())) for r in rankings]
    items = [body.candidates[index] for index in shown[0]]
    return (
        items,
        [score[team][item] for item, team in zip(items, teams[0])],
        [arms[team].name for team in teams[0]],
    )


def _require_id_kinds(body: RankRequest, ranker: OnlineRanker) -> None:
    """A 422 unless the request's IDs are strings where the model's data has string IDs and
    integers where it has integer ones."""
    store = ranker.store
    try:
        require_id_kind([body.user_id], store.user_ids, "user_id", ranker.name)
        items = [*body.candidates, *body.recent_items]
        require_id_kind(items, store.item_ids, "item IDs", ranker.name)
    except ValueError as error:
        raise HTTPException(422, str(error)) from None


def _warm_up(ranker: OnlineRanker, max_candidates: int) -> None:
    """Run representative requests so the first real one pays no one-off costs."""
    store = ranker.store
    items = store.items.values
    known, unknown = int(store.users.values[0]), int(store.users.values[-1]) + 1
    for size in (min(100, len(items)), min(max_candidates, len(items))):
        for _ in range(WARM_UP_ROUNDS):
            ranker.rank(known, items[:size], items[:3])
            ranker.rank(unknown, items[:size])
