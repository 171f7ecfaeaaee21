"""In-process serving latency per request, beside its floor: teacher vs student, served the same way.

Exports the run's models to a scratch directory, then times requests of 100, 500 and 1000
candidates for distinct real users of the test lists, on one torch thread and one BLAS thread
(as a request is served):

- ``numpy``: the floor of the ranker, ``serving_floor.NumpyReference``: the same weights in
  plain numpy, user tower per request, item vectors precomputed, ID mapping and sort. Its
  scores are checked against the ranker's (``max |Δ|``).
- ``ranker``: ``OnlineRanker.rank`` with the plain user tower run on every request (no
  user-vector cache), items precomputed; ``cached``: as served, the user's vector read from
  the cache the load filled; ``torchrec``: the training-time modules for both towers on
  every request (``--inference torchrec --no-precompute-items --user-cache 0``).
- ``server``: the whole FastAPI app as served, in-process, driven through an ASGI client
  without sockets, timed by the server itself from request received to response ready
  (validation, routing, ranking, JSON, impression log), as its ``/metrics`` histogram
  records it; ``uncached``: the same with ``--user-cache 0``; ``bare``:
  ``serving_floor.bare_app``, parsing the same request and answering fixed bytes, timed the
  same way (it does not depend on the model).

Every model is served the same way, so the last table's teacher / model p50 ratios compare
models, not code paths. Each model is labelled with its user encoder: ``[seq]`` reads the
history through self-attention, ``[bag]`` mean-pools it; a legend gives every model's spec.

    .venv/bin/python benchmarks/serving_latency.py --run runs/synthetic
    .venv/bin/python benchmarks/serving_latency.py --run runs/ml100k --models teacher student
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx2
import numpy as np
import pyarrow.parquet as pq
from fastapi import FastAPI
from serving_floor import NumpyReference, bare_app, use_one_thread

from recdistill.artifact import Artifact, export_artifact, load_artifact
from recdistill.config import load_run_config
from recdistill.impressions import read_log
from recdistill.layout import IMPRESSIONS, DataLayout, RunLayout
from recdistill.online import OnlineRanker
from recdistill.server import ServerSettings
from recdistill.summary import read_summary
from serving.app import create_app

SIZES = (100, 500, 1000)
ENCODER_TAGS = {"sequence": "seq", "bag": "bag"}
WARM_UP = 20


def label(artifact: Artifact) -> str:
    """The model's name tagged with its user encoder, e.g. ``teacher[seq]``."""
    if artifact.model is None:
        return artifact.name
    return f"{artifact.name}[{ENCODER_TAGS[artifact.model.spec.user_encoder]}]"


def legend(artifact: Artifact) -> str:
    """One line on what a measured model is: its encoder, spec and parameter count."""
    if artifact.model is None:
        return f"{artifact.name}: {artifact.kind}"
    spec = artifact.model.spec
    encoder = "mean-pooled history bag"
    if spec.is_sequence:
        encoder = (
            f"sequence encoder over the {spec.max_length} most recent items, "
            f"{spec.layers} layer(s) x {spec.heads} heads, readout {spec.readout}"
        )
    tower = "x".join(str(width) for width in spec.tower) or "none"
    return (
        f"{label(artifact)}: {encoder}; embedding_dim {spec.embedding_dim}, tower {tower}; "
        f"{artifact.params:,} params"
    )


def requests_for(data: Path, size: int, count: int, seed: int = 0) -> list[dict]:
    """Distinct test-list users (as many as there are, up to ``count``) with their
    candidates, padded with other catalogue items to ``size``."""
    table = pq.read_table(DataLayout(data).candidates("test")).to_pydict()
    catalogue = np.unique(np.concatenate([np.asarray(c) for c in table["candidates"]]))
    rng = np.random.default_rng(seed)
    rows = rng.permutation(len(table["user_id"]))[:count]
    bodies = []
    for row in rows:
        own = np.asarray(table["candidates"][row])
        others = rng.permutation(np.setdiff1d(catalogue, own))[: size - len(own)]
        candidates = [int(c) for c in [*own, *others][:size]]
        bodies.append({"user_id": int(table["user_id"][row]), "candidates": candidates})
    return bodies


def percentiles(seconds: list[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(np.asarray(seconds) * 1000, [50, 99])
    return float(p50), float(p99)


def time_calls(rank: Callable[[int, np.ndarray], object], bodies: list[dict]) -> list[float]:
    seconds = []
    for body in bodies:
        candidates = np.asarray(body["candidates"])
        start = time.perf_counter()
        rank(body["user_id"], candidates)
        seconds.append(time.perf_counter() - start)
    return seconds


def largest_difference(
    reference: NumpyReference, ranker: OnlineRanker, bodies: list[dict]
) -> float:
    difference = 0.0
    for body in bodies:
        _, expected = reference.rank(body["user_id"], np.asarray(body["candidates"]))
        got = ranker.rank(body["user_id"], np.asarray(body["candidates"])).scores
        difference = max(difference, float(np.abs(expected - got).max()))
    return difference


async def post_all(app: FastAPI, bodies: list[dict]) -> None:
    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://bench") as client:
        for body in bodies:
            (await client.post("/rank", json=body)).raise_for_status()


async def time_server(
    settings: ServerSettings, warm_up: list[dict], bodies: list[dict]
) -> list[float]:
    """Server-side seconds per request of ``bodies``, from its impression log."""
    app = create_app(settings)
    log = Path(settings.impressions)
    async with app.router.lifespan_context(app):
        await post_all(app, warm_up)
        logged = len(read_log(log))
        await post_all(app, bodies)
    return [impression["latency_ms"] / 1000 for impression in read_log(log)[logged:]]


async def time_bare_app(warm_up: list[dict], bodies: list[dict]) -> list[float]:
    app = bare_app()
    await post_all(app, warm_up)
    del app.state.latencies[:]
    await post_all(app, bodies)
    return app.state.latencies


def measure(directory: Path, bodies: list[dict], scratch: Path) -> dict[str, list[float] | float]:
    """Every column of one model at one request size."""
    artifact = load_artifact(directory)
    warm_up, timed = bodies[:WARM_UP], bodies[WARM_UP:]
    reference = NumpyReference(artifact)
    rankers = {
        "ranker": OnlineRanker(load_artifact(directory), user_cache=0),
        "cached": OnlineRanker(load_artifact(directory)),
        "torchrec": OnlineRanker(
            load_artifact(directory), inference="torchrec", precompute_items=False, user_cache=0
        ),
    }
    columns = {"difference": largest_difference(reference, rankers["ranker"], warm_up)}
    for ranks in (reference.rank, *(ranker.rank for ranker in rankers.values())):
        time_calls(ranks, warm_up)
    columns["numpy"] = time_calls(reference.rank, timed)
    for name, ranker in rankers.items():
        columns[name] = time_calls(ranker.rank, timed)
    for name, cache in (("server", ServerSettings.user_cache), ("uncached", 0)):
        settings = ServerSettings(
            artifacts=(str(directory),), impressions=str(scratch / IMPRESSIONS), user_cache=cache
        )
        columns[name] = asyncio.run(time_server(settings, warm_up, timed))
    return columns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/ml100k"))
    parser.add_argument("--requests", type=int, default=300, help="timed requests per cell")
    parser.add_argument(
        "--models",
        nargs="+",
        help="the run's models to measure (default: its reference teacher and distilled stages)",
    )
    parser.add_argument(
        "--sizes", nargs="+", type=int, default=list(SIZES), help="candidates per request"
    )
    args = parser.parse_args()
    use_one_thread()
    config = load_run_config(RunLayout(args.run).config)
    reference = config.roles.reference
    distilled = [stage.name for stage in config.stages if stage.teachers]
    models = args.models or [reference, *distilled]
    reference = reference if reference in models else models[0]
    scratch = Path(tempfile.mkdtemp(prefix="serving-latency-"))
    artifacts = {name: scratch / name for name in models}
    for name, directory in artifacts.items():
        export_artifact(args.run, name, directory)
    labels = {name: label(load_artifact(directory)) for name, directory in artifacts.items()}
    run_data = Path(read_summary(RunLayout(args.run).summary).data)
    print(
        f"run {args.run}, up to {args.requests} requests of distinct users per cell, "
        "1 torch thread, 1 BLAS thread; p50 (p99) in ms"
    )
    for directory in artifacts.values():
        print(f"  {legend(load_artifact(directory))}")
    header = (
        f"{'model':<20}{'cands':>6}{'numpy':>8}{'ranker':>16}{'×numpy':>8}{'cached':>8}"
        f"{'torchrec':>10}{'×ranker':>8}{'server':>16}{'uncached':>10}{'bare':>8}{'×bare':>14}"
        f"{'max |Δ|':>9}"
    )
    print(header)
    ratios = []
    for size in args.sizes:
        bodies = requests_for(run_data, size, args.requests + WARM_UP)
        results = {name: measure(artifacts[name], bodies, scratch) for name in models}
        bare, _ = percentiles(asyncio.run(time_bare_app(bodies[:WARM_UP], bodies[WARM_UP:])))
        shown = len(bodies[0]["candidates"])  # fewer than size in a smaller catalogue
        p50 = {}
        for name, columns in results.items():
            (numpy, _), (ranker, ranker99) = (
                percentiles(columns["numpy"]),
                percentiles(columns["ranker"]),
            )
            (cached, _), (torchrec, _) = (
                percentiles(columns["cached"]),
                percentiles(columns["torchrec"]),
            )
            server, server99 = percentiles(columns["server"])
            uncached, _ = percentiles(columns["uncached"])
            p50[name] = (ranker, uncached)
            print(
                f"{labels[name]:<20}{shown:>6}{numpy:>8.3f}{ranker:>8.3f} ({ranker99:.3f})"
                f"{ranker / numpy:>7.1f}×{cached:>8.3f}{torchrec:>10.3f}{torchrec / ranker:>7.1f}×"
                f"{server:>8.3f} ({server99:.3f}){uncached:>10.3f}{bare:>8.3f}"
                f"{server / bare:>6.1f}× /{uncached / bare:>5.1f}×"
                f"{columns['difference']:>9.1e}"
            )
        ratios.append((shown, p50))
    print(f"\n{reference} / model p50, each computing the user tower (ranker / uncached)")
    for shown, p50 in ratios:
        cells = "  ".join(
            f"{labels[name]} {p50[reference][0] / ranker:.1f}× / {p50[reference][1] / app:.1f}×"
            for name, (ranker, app) in p50.items()
            if name != reference
        )
        print(f"  {shown:>5} candidates: {cells}")


if __name__ == "__main__":
    main()
