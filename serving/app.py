"""The real-time ranking service: FastAPI over one or more exported artifacts.

``POST /rank`` routes the user to an A/B arm (``recdistill.routing``), ranks the candidates
with that arm's model (``recdistill.online``), appends the response to the impression log
and returns it. Models are loaded and warmed up in the lifespan hook; ``/readyz`` answers
200 only after that. ``POST /admin/reload`` swaps one model for a newly loaded artifact; if
loading fails for any reason the old model keeps serving.

The ranking endpoint is ``async`` and runs the model inline on the event loop: a request
costs well under a millisecond of CPU and torch runs one thread per worker, so a thread pool
would only add hand-offs.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import orjson
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recdistill.artifact import load_artifact
from recdistill.config import load_config, section
from recdistill.online import OnlineRanker
from recdistill.routing import Routing

ADMIN_TOKEN_ENV = "RECDISTILL_ADMIN_TOKEN"
SETTINGS_ENV = "RECDISTILL_SERVE_SETTINGS"
# Fine at the low end, where a healthy student lives, so p99 can be read off the histogram.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075,
    0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
ROUTES = ("/rank", "/healthz", "/readyz", "/model", "/metrics", "/admin/reload")
WARM_UP_ROUNDS = 5

ExternalId = Annotated[int, Field(strict=True, ge=-(2**63), le=2**63 - 1)]


@dataclass(frozen=True)
class ServerSettings:
    artifacts: tuple[str, ...]
    ab_config: str | None = None
    impressions: str = "impressions.jsonl"
    max_candidates: int = 1000
    max_body_bytes: int = 64 * 1024
    threads: int = 1
    precompute_items: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServerSettings:
        values = json.loads(text)
        return cls(**{**values, "artifacts": tuple(values["artifacts"])})


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: ExternalId
    candidates: list[ExternalId] = Field(min_length=1)
    k: int | None = Field(default=None, gt=0, strict=True)
    recent_items: list[ExternalId] = Field(
        default_factory=list, description="this session's items, most recent first"
    )

    @field_validator("candidates")
    @classmethod
    def _distinct(cls, candidates: list[int]) -> list[int]:
        if len(set(candidates)) != len(candidates):
            raise ValueError("candidates must be distinct")
        return candidates


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    artifact: str
    model: str | None = Field(default=None, description="served model to replace")


class RankedItem(BaseModel):
    item_id: int
    score: float


class RankResponse(BaseModel):
    request_id: str
    model: str
    version: str
    arm: str
    cold_start: bool
    unknown_items: list[int]
    items: list[RankedItem]


@dataclass
class ServiceState:
    settings: ServerSettings
    routing: Routing | None = None
    rankers: dict[str, OnlineRanker] = field(default_factory=dict)
    ready: bool = False
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    impressions: int | None = None


class Telemetry:
    """The Prometheus metrics of one app (its own registry, so apps never collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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


def create_app(settings: ServerSettings) -> FastAPI:
    state = ServiceState(settings)
    telemetry = Telemetry()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threads = torch.get_num_threads()
        torch.set_num_threads(settings.threads)
        rankers = await run_in_threadpool(_load_all, settings)
        state.routing = routing_for(settings, set(rankers))
        state.rankers = rankers
        for ranker in rankers.values():
            telemetry.serving(ranker)
        state.impressions = _open_log(settings.impressions)
        state.ready = True
        try:
            yield
        finally:
            state.ready = False
            os.close(state.impressions)
            torch.set_num_threads(threads)

    app = FastAPI(
        title="recdistill ranker",
        summary="Ranks candidate items for a user with a distilled recommender model.",
        lifespan=lifespan,
    )
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestCounter, telemetry=telemetry)

    @app.post("/rank", response_model=RankResponse)
    async def rank(body: RankRequest, request: Request) -> Response:
        """Rank ``candidates`` for ``user_id``; the top ``k`` (all if not given), best first."""
        if not state.ready:
            raise HTTPException(503, "models are still loading")
        if len(body.candidates) > settings.max_candidates:
            raise HTTPException(
                422, f"{len(body.candidates)} candidates; at most {settings.max_candidates}"
            )
        arm = state.routing.arm_of(body.user_id)
        ranker = state.rankers[arm.model]
        ranking = ranker.rank(
            body.user_id, np.asarray(body.candidates), np.asarray(body.recent_items)
        )
        shown = slice(0, body.k)
        items, scores = ranking.items[shown].tolist(), ranking.scores[shown].tolist()
        request_id = uuid.uuid4().hex
        payload = {
            "request_id": request_id,
            "model": ranker.name,
            "version": ranker.version,
            "arm": arm.name,
            "cold_start": ranking.cold_start,
            "unknown_items": ranking.unknown.tolist(),
            "items": [{"item_id": i, "score": s} for i, s in zip(items, scores)],
        }
        content = orjson.dumps(payload)
        latency = time.perf_counter() - request.state.received_at
        telemetry.rank_latency.labels(ranker.name, arm.name).observe(latency)
        impression = {
            "request_id": request_id,
            "time": time.time(),
            "user_id": body.user_id,
            "arm": arm.name,
            "model": ranker.name,
            "version": ranker.version,
            "n_candidates": len(body.candidates),
            "items": items,
            "cold_start": ranking.cold_start,
            "latency_ms": latency * 1000,
        }
        os.write(state.impressions, orjson.dumps(impression) + b"\n")
        return Response(content, media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz")
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

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus metrics: request counts, /rank latency histogram per model and arm."""
        return Response(generate_latest(telemetry.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload")
    async def reload(body: ReloadRequest, request: Request) -> dict[str, Any]:
        """Swap a served model for the artifact at ``artifact``; needs the admin token.

        The new model is loaded and warmed up beside the old one, then swapped in; if that
        fails the old model keeps serving and the response says why.
        """
        _authorize(request)
        async with state.reload_lock:
            try:
                ranker = await run_in_threadpool(_load_ranker, body.artifact, settings)
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


class BodySizeLimit:
    """Answer 413 to bodies over ``limit`` bytes, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit():
            return await _plain(send, 400, "Content-Length is not a number")
        if int(declared) > self.limit:
            return await _plain(send, 413, f"request body over {self.limit} bytes")
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


class RequestCounter:
    """Count responses by route and status, and stamp when each request arrived."""

    def __init__(self, app: ASGIApp, telemetry: Telemetry) -> None:
        self.app = app
        self.telemetry = telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})["received_at"] = time.perf_counter()
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.telemetry.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


async def _plain(send: Send, status: int, detail: str) -> None:
    body = orjson.dumps({"detail": detail})
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _authorize(request: Request) -> None:
    token = os.environ.get(ADMIN_TOKEN_ENV)
    if not token:
        raise HTTPException(401, f"admin endpoints are disabled: set {ADMIN_TOKEN_ENV}")
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise HTTPException(401, "missing or wrong admin token (Authorization: Bearer …)")


def _load_ranker(directory: str, settings: ServerSettings) -> OnlineRanker:
    ranker = OnlineRanker(
        load_artifact(Path(directory)), precompute_items=settings.precompute_items
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


def routing_for(settings: ServerSettings, models: set[str]) -> Routing:
    """The A/B routing of ``settings`` over the served ``models``, checked against them."""
    if settings.ab_config is None:
        if len(models) > 1:
            raise ValueError("several artifacts need an A/B config (--ab) to route between them")
        return Routing.single(next(iter(models)))
    routing = Routing.from_config(section(load_config(Path(settings.ab_config)), "ab"))
    unknown = sorted({arm.model for arm in routing.arms} - models)
    if unknown:
        raise ValueError(f"A/B arms use {unknown}, which no --artifact provides ({sorted(models)})")
    return routing


def _warm_up(ranker: OnlineRanker, max_candidates: int) -> None:
    """Run representative requests so the first real one pays no one-off costs."""
    store = ranker.store
    items = store.items.values
    known, unknown = int(store.users.values[0]), int(store.users.values[-1]) + 1
    for size in (min(100, len(items)), min(max_candidates, len(items))):
        for _ in range(WARM_UP_ROUNDS):
            ranker.rank(known, items[:size], items[:3])
            ranker.rank(unknown, items[:size])


def _open_log(path: str) -> int:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
