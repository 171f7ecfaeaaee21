"""In-process serving latency per request: teacher vs intermediate vs student, side by side.

Exports the run's models to a scratch directory, then times requests of 100, 500 and 1000
candidates for real users of the test lists on one torch thread (as served by default):

- ``ranker``: ``OnlineRanker.rank`` alone (ID mapping, both towers, sort);
- ``server``: the whole FastAPI app in-process, driven through an ASGI client without
  sockets, timed by the server itself from request received to response ready (validation,
  routing, ranking, JSON), as its ``/metrics`` histogram and impression log record it.

Both item-tower modes are measured: run per request (the server's default) and
precomputed at load (``--precompute-items``). Ratios are the run's reference teacher / model
p50 and p99 in the same run (the first model measured when ``--models`` leaves it out).

Each model is labelled with its user encoder: ``teacher[seq]`` reads the history through a
sequence encoder (self-attention over its ``max_length`` most recent items; the request's
``recent_items`` would enter at its front, at the same cost), ``[bag]`` mean-pools it. A
legend above the table gives every model's encoder, spec and parameter count.

    .venv/bin/python benchmarks/serving_latency.py --run runs/ml100k
    .venv/bin/python benchmarks/serving_latency.py --run runs/ml100k --models teacher student
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx2
import numpy as np
import pyarrow.parquet as pq
import torch

from recdistill.artifact import Artifact, export_artifact, load_artifact
from recdistill.config import load_run_config
from recdistill.impressions import read_impressions
from recdistill.layout import IMPRESSIONS, DataLayout, RunLayout
from recdistill.online import OnlineRanker
from recdistill.server import ServerSettings
from recdistill.summary import read_summary
from serving.app import create_app

SIZES = (100, 500, 1000)
ENCODER_TAGS = {"sequence": "seq", "bag": "bag"}


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
    """Test-list users with their candidates, padded with other catalogue items to ``size``."""
    table = pq.read_table(DataLayout(data).candidates("test")).to_pydict()
    catalogue = np.unique(np.concatenate([np.asarray(c) for c in table["candidates"]]))
    rng = np.random.default_rng(seed)
    bodies = []
    for row in rng.integers(len(table["user_id"]), size=count):
        own = np.asarray(table["candidates"][row])
        others = rng.permutation(np.setdiff1d(catalogue, own))[: size - len(own)]
        bodies.append({"user_id": table["user_id"][row], "candidates": [*own, *others][:size]})
    return [{**b, "candidates": [int(c) for c in b["candidates"]]} for b in bodies]


def percentiles(seconds: list[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(np.asarray(seconds) * 1000, [50, 99])
    return float(p50), float(p99)


def time_ranker(ranker: OnlineRanker, bodies: list[dict]) -> tuple[float, float]:
    seconds = []
    for body in bodies:
        candidates = np.asarray(body["candidates"])
        start = time.perf_counter()
        ranker.rank(body["user_id"], candidates)
        seconds.append(time.perf_counter() - start)
    return percentiles(seconds)


async def time_server(settings: ServerSettings, bodies: list[dict]) -> tuple[float, float]:
    app = create_app(settings)
    log = Path(settings.impressions)
    async with app.router.lifespan_context(app):
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://bench") as client:
            for body in bodies[:20]:
                await client.post("/rank", json=body)
            logged = len(read_impressions(log))
            for body in bodies:
                (await client.post("/rank", json=body)).raise_for_status()
    latencies = [impression["latency_ms"] for impression in read_impressions(log)[logged:]]
    return percentiles([ms / 1000 for ms in latencies])


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
    torch.set_num_threads(1)
    config = load_run_config(RunLayout(args.run).config)
    reference = config.roles.reference
    distilled = [stage.name for stage in config.stages if stage.teachers]
    models = args.models or [reference, *distilled]
    scratch = Path(tempfile.mkdtemp(prefix="serving-latency-"))
    artifacts = {name: scratch / name for name in models}
    for name, directory in artifacts.items():
        export_artifact(args.run, name, directory)
    labels = {}
    run_data = Path(read_summary(RunLayout(args.run).summary).data)
    print(f"run {args.run}, {args.requests} requests per cell, 1 torch thread; times in ms")
    for name, directory in artifacts.items():
        artifact = load_artifact(directory)
        labels[name] = label(artifact)
        print(f"  {legend(artifact)}")
    reference = reference if reference in artifacts else models[0]
    ratio = f"{reference}/model p50"
    header = f"{'items':<12}{'model':<20}{'cands':>6}{'ranker p50':>12}{'p99':>8}"
    header += f"{'server p50':>12}{'p99':>8}{ratio:>19}{'p99':>7}"
    print(header)
    for precompute in (False, True):
        mode = "precomputed" if precompute else "per request"
        for size in args.sizes:
            bodies = requests_for(run_data, size, args.requests)
            results = {}
            for name in models:
                ranker = OnlineRanker(load_artifact(artifacts[name]), precompute_items=precompute)
                for body in bodies[:20]:
                    ranker.rank(body["user_id"], np.asarray(body["candidates"]))
                settings = ServerSettings(
                    artifacts=(str(artifacts[name]),),
                    impressions=str(scratch / IMPRESSIONS),
                    precompute_items=precompute,
                )
                results[name] = (
                    time_ranker(ranker, bodies),
                    asyncio.run(time_server(settings, bodies)),
                )
            reference_p50, reference_p99 = results[reference][1]
            shown = len(bodies[0]["candidates"])  # fewer than size in a smaller catalogue
            for name, ((r50, r99), (s50, s99)) in results.items():
                print(
                    f"{mode:<12}{labels[name]:<20}{shown:>6}{r50:>12.3f}{r99:>8.3f}"
                    f"{s50:>12.3f}{s99:>8.3f}"
                    f"{reference_p50 / s50:>18.1f}×{reference_p99 / s99:>6.1f}×"
                )


if __name__ == "__main__":
    main()
