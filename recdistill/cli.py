"""The ``recdistill`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

from recdistill.errors import MissingExtra, TrainingDiverged
from recdistill.layout import RunLayout, SweepLayout
from recdistill.server import (
    GRACEFUL_SHUTDOWN_S,
    INFERENCE_PATHS,
    SETTINGS_ENV,
    ServerSettings,
    routing_for,
)

Spec = TypeVar("Spec")
TRACK_HELP = "log to MLflow, whatever [tracking] says (docs/experiment-tracking.md)"
DEVICE_HELP = (
    "auto, cpu, cuda or cuda:N (default: the RECDISTILL_DEVICE environment variable, else "
    "auto: the GPU when there is one)"
)
EXAMPLES = """commands:
  recdistill data synthetic --out data/synthetic [--users N --items M --seed S]
  recdistill data movielens --path ../shared/datasets/ml-100k --out data/ml100k
  recdistill train --config configs/ml100k.toml --data data/ml100k --out runs/ml100k [--resume]
  recdistill sweep --config configs/sweep_ml100k.toml --data data/ml100k --out runs/sweep --jobs 2
  recdistill report --run runs/ml100k
  recdistill export --run runs/ml100k --model student --out artifacts/student
  recdistill serve --artifact artifacts/student [--artifact ... --ab configs/ab.toml]
  recdistill abtest --config configs/ab.toml --out runs/ab [--mode online]
  recdistill abtest analyze --config configs/ab.toml --impressions LOG --events LOG --out runs/live
"""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except (ValueError, KeyError, FileNotFoundError, TrainingDiverged, MissingExtra) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"recdistill: error: {message}", file=sys.stderr)
        return 2
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recdistill",
        description="Distil large recommender ranking models into tiny real-time students.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"recdistill {version('recdistill')}"
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="build a data directory (tables, splits, candidates)")
    sources = data.add_subparsers(required=True, metavar="SOURCE")

    synthetic = sources.add_parser(
        "synthetic", help="generate the synthetic world with a known ground truth"
    )
    synthetic.add_argument("--out", type=Path, required=True, help="data directory to write")
    synthetic.add_argument("--config", type=Path, help="TOML with [data.synthetic], [data.split]")
    synthetic.add_argument("--users", type=int, help="number of users")
    synthetic.add_argument("--items", type=int, help="number of items")
    synthetic.add_argument("--mean-activity", type=float, help="mean interactions per user")
    synthetic.add_argument("--seed", type=int, help="seed of the generator and of the split")
    synthetic.set_defaults(handler=_data_synthetic)

    movielens = sources.add_parser("movielens", help="read MovieLens (ml-100k or ml-latest layout)")
    movielens.add_argument("--path", type=Path, required=True, help="raw MovieLens directory")
    movielens.add_argument("--out", type=Path, required=True, help="data directory to write")
    movielens.add_argument("--config", type=Path, help="TOML with a [data.split] table")
    movielens.add_argument("--seed", type=int, help="seed of the candidate sampling")
    movielens.set_defaults(handler=_data_movielens)

    imported = sources.add_parser(
        "import",
        help="read your own interaction log (CSV, Parquet or JSON Lines) and feature tables",
        description="Read an interaction log into a data directory (docs/data.md, "
        '"Your own data"). Repeated events of a (user, item) pair count once, the latest kept.',
    )
    imported.add_argument(
        "--interactions", type=Path, required=True, help="log file (.csv, .parquet, .jsonl)"
    )
    imported.add_argument("--user", required=True, help="column of the user ID")
    imported.add_argument("--item", required=True, help="column of the item ID")
    imported.add_argument("--time", required=True, help="column of the timestamp")
    imported.add_argument(
        "--time-unit",
        default="auto",
        help="s, ms or iso (%(default)s: numbers from 1e11 up as ms, below as s, text as iso)",
    )
    imported.add_argument("--rating", help="column of an explicit rating")
    imported.add_argument("--min-rating", type=float, help="keep rows rated at least this")
    imported.add_argument(
        "--k-core", type=int, default=1, help="drop users and items with fewer partners"
    )
    imported.add_argument("--users", type=Path, help="table of user features")
    imported.add_argument("--user-key", help="its user ID column (default: --user)")
    imported.add_argument(
        "--user-features", help="comma-separated categorical columns (default: all others)"
    )
    imported.add_argument("--items", type=Path, help="table of item features")
    imported.add_argument("--item-key", help="its item ID column (default: --item)")
    imported.add_argument("--item-categories", help="column of the item's categories")
    imported.add_argument("--item-title", help="column of the item's display name")
    imported.add_argument(
        "--list-separator", default="|", help="joins categories in text (%(default)s)"
    )
    imported.add_argument(
        "--encoding", default="utf-8", help="of the CSV and JSON Lines files (%(default)s)"
    )
    imported.add_argument(
        "--delimiter",
        default=",",
        help="between a CSV's fields: one character, or tab (%(default)s)",
    )
    imported.add_argument("--out", type=Path, required=True, help="data directory to write")
    imported.add_argument("--force", action="store_true", help="replace an existing --out")
    imported.add_argument("--config", type=Path, help="TOML with a [data.split] table")
    imported.add_argument("--seed", type=int, help="seed of the candidate sampling")
    imported.set_defaults(handler=_data_import)

    train = commands.add_parser(
        "train", help="train teacher, intermediate and students; score baselines; summary.json"
    )
    train.add_argument("--config", type=Path, required=True, help="TOML with models and stages")
    train.add_argument("--data", type=Path, required=True, help="data directory")
    train.add_argument("--out", type=Path, required=True, help="run directory to write")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoints")
    train.add_argument("--track", action="store_true", help=TRACK_HELP)
    train.add_argument("--device", help=DEVICE_HELP)
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help="change one value of the config, e.g. stages.teacher.epochs=5 (repeatable); "
        "the run's config.toml records the result",
    )
    train.set_defaults(handler=_train)

    sweep = commands.add_parser(
        "sweep",
        help="search student architectures × loss mixes, int8 copies, choose under a budget",
    )
    sweep.add_argument("--config", type=Path, required=True, help="TOML with [sweep], [mixes]…")
    sweep.add_argument("--data", type=Path, required=True, help="data directory")
    sweep.add_argument("--out", type=Path, required=True, help="sweep directory (resumable)")
    sweep.add_argument(
        "--jobs", type=int, default=1, help="candidates trained in parallel (%(default)s)"
    )
    sweep.add_argument("--track", action="store_true", help=TRACK_HELP)
    sweep.add_argument("--device", help=DEVICE_HELP)
    sweep.set_defaults(handler=_sweep)

    report = commands.add_parser(
        "report", help="segment-level evaluation report (HTML, Markdown, segments.parquet)"
    )
    report.add_argument("--run", type=Path, required=True, help="run directory of `train`")
    report.add_argument("--min-users", type=int, help="smallest slice reported (default 30)")
    report.add_argument(
        "--retention-threshold",
        type=float,
        help="the overall retention of the teacher a model must keep (0.95)",
    )
    report.set_defaults(handler=_report)

    export = commands.add_parser(
        "export", help="write a self-contained serving artifact of one model of a run"
    )
    export.add_argument("--run", type=Path, required=True, help="run directory of `train`")
    export.add_argument(
        "--model", required=True, help="teacher, student, ..., popularity or an ensemble"
    )
    export.add_argument("--out", type=Path, required=True, help="artifact directory to write")
    export.add_argument("--data", type=Path, help="data directory, if not the run's own")
    export.add_argument(
        "--format",
        choices=("artifact", "onnx"),
        default="artifact",
        help="a serving artifact for `recdistill serve`, or the model as ONNX with its "
        "vocabularies for another serving stack (and as an onnx teacher) (%(default)s)",
    )
    export.set_defaults(handler=_export)

    serve = commands.add_parser("serve", help="serve artifacts behind the HTTP ranking API")
    serve.add_argument(
        "--artifact", type=Path, action="append", required=True, help="artifact (repeatable)"
    )
    serve.add_argument("--ab", type=Path, help="TOML with an [ab] table routing users to arms")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (%(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port (%(default)s)")
    serve.add_argument("--workers", type=int, default=1, help="server processes (%(default)s)")
    serve.add_argument(
        "--threads",
        type=int,
        default=ServerSettings.threads,
        help="torch threads per worker (%(default)s)",
    )
    serve.add_argument(
        "--impressions",
        type=Path,
        default=Path(ServerSettings.impressions),
        help="impression log (JSONL) to append to, its folder created if missing and its full "
        "path printed at start-up (%(default)s, under the current folder)",
    )
    serve.add_argument(
        "--events",
        type=Path,
        help="event log (JSONL) POST /feedback appends clicks and conversions to "
        "(default: events.jsonl beside the impression log)",
    )
    serve.add_argument(
        "--max-candidates",
        type=int,
        default=ServerSettings.max_candidates,
        help="per request (%(default)s)",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        default=ServerSettings.max_body_bytes,
        help="request size limit (%(default)s)",
    )
    serve.add_argument(
        "--artifact-root",
        type=Path,
        help="directory /admin/reload may load artifacts from "
        "(default: the common parent directory of the --artifact directories)",
    )
    serve.add_argument(
        "--precompute-items",
        action=argparse.BooleanOptionalAction,
        default=ServerSettings.precompute_items,
        help="run the item tower once over the catalogue at load; --no-precompute-items runs "
        "it on each request's candidates, for catalogues too large to hold (on)",
    )
    serve.add_argument(
        "--inference",
        choices=INFERENCE_PATHS,
        default=ServerSettings.inference,
        help="the user tower as plain tensor ops on the model's weights, or through the "
        "torchrec modules training uses, for comparison (%(default)s)",
    )
    serve.add_argument(
        "--user-cache",
        type=int,
        default=ServerSettings.user_cache,
        help="known users' vectors kept per model for requests without recent_items; "
        "0 keeps none (%(default)s)",
    )
    serve.set_defaults(handler=_serve)

    abtest = commands.add_parser(
        "abtest",
        help="simulated A/B or interleaving test of served models, or `abtest analyze` of "
        "live traffic (HTML/Markdown report, request log)",
    )
    abtest.add_argument("--config", type=Path, help="TOML with [ab], [artifacts]… (required)")
    abtest.add_argument("--out", type=Path, help="report directory to write (required)")
    abtest.add_argument(
        "--mode", choices=("offline", "online"), help="rank in-process or through a real server"
    )
    abtest.add_argument("--seed", type=int, help="seed of the simulation")
    abtest.add_argument("--device", help=DEVICE_HELP + "; scores the in-process arms' batches")
    abtest.set_defaults(handler=_abtest)
    actions = abtest.add_subparsers(required=False, metavar="analyze")
    analyze = actions.add_parser(
        "analyze",
        help="judge live traffic: the server's impression log joined with its events",
        description="The report and verdict `recdistill abtest` writes, from a server's "
        "impression log and the clicks and conversions reported for its requests "
        '(docs/simulated-a-b-tests.md, "Live traffic").',
    )
    analyze.add_argument("--config", type=Path, required=True, help="TOML with [ab], [analysis]")
    analyze.add_argument("--impressions", type=Path, required=True, help="the server's log")
    analyze.add_argument("--events", type=Path, help="the server's event log (POST /feedback)")
    analyze.add_argument(
        "--events-from",
        type=Path,
        help="the platform's event export, CSV or Parquet: request_id, item_id, event, time",
    )
    analyze.add_argument("--data", type=Path, help="data directory with the users' segments")
    analyze.add_argument("--out", type=Path, required=True, help="report directory to write")
    analyze.set_defaults(handler=_abtest_analyze)
    return parser


def _data_synthetic(args: argparse.Namespace) -> None:
    from recdistill.config import load_run_config
    from recdistill.data.prepare import prepare
    from recdistill.data.summary import describe
    from recdistill.data.synthetic import generate
    from recdistill.files import atomic_output_dir

    data = load_run_config(args.config).data
    spec = _overridden(
        data.synthetic,
        users=args.users,
        items=args.items,
        mean_activity=args.mean_activity,
        seed=args.seed,
    )
    split = _overridden(data.split, seed=args.seed)
    with atomic_output_dir(args.out) as scratch:
        generate(spec, scratch)
        prepare(scratch, split)
    print(describe(args.out))


def _data_movielens(args: argparse.Namespace) -> None:
    from recdistill.config import load_run_config
    from recdistill.data.movielens import read_movielens
    from recdistill.data.prepare import prepare
    from recdistill.data.summary import describe
    from recdistill.data.tables import write_raw
    from recdistill.files import atomic_output_dir

    split = _overridden(load_run_config(args.config).data.split, seed=args.seed)
    raw = read_movielens(args.path)
    with atomic_output_dir(args.out) as scratch:
        write_raw(scratch, raw)
        prepare(scratch, split)
    print(describe(args.out))


def _data_import(args: argparse.Namespace) -> None:
    from recdistill.api import prepare_data
    from recdistill.config import load_run_config
    from recdistill.data.importer import ItemTable, UserTable
    from recdistill.data.summary import describe

    users = items = None
    if args.users is not None:
        features = tuple(args.user_features.split(",")) if args.user_features else ()
        users = UserTable(args.users, args.user_key or args.user, features)
    if args.items is not None:
        items = ItemTable(
            args.items,
            args.item_key or args.item,
            categories=args.item_categories,
            title=args.item_title,
            separator=args.list_separator,
        )
    prepare_data(
        args.interactions,
        args.out,
        user=args.user,
        item=args.item,
        time=args.time,
        rating=args.rating,
        min_rating=args.min_rating,
        time_unit=args.time_unit,
        users=users,
        items=items,
        k_core=args.k_core,
        split=_overridden(load_run_config(args.config).data.split, seed=args.seed),
        encoding=args.encoding,
        delimiter=args.delimiter,
        force=args.force,
    )
    print(describe(args.out))


def _train(args: argparse.Namespace) -> None:
    from recdistill.api import train
    from recdistill.config import assignments, load_run_config
    from recdistill.distributed import world
    from recdistill.pipeline import summary_table
    from recdistill.tracking import location
    from recdistill.trainer import duration

    tracked = ["tracking.enabled=true"] if args.track else []
    started = time.perf_counter()
    config = load_run_config(args.config, assignments([*args.set, *tracked]))
    summary = train(config, args.data, args.out, resume=args.resume, device=args.device)
    if not world().is_main:
        return
    layout = RunLayout(args.out)
    print(summary_table(summary))
    print(f"\nwrote {layout.summary}; the run took {duration(time.perf_counter() - started)}")
    if config.tracking.enabled and (tracked_at := location(layout)) is not None:
        print(f"tracked: {tracked_at}")
    student = (config.roles and config.roles.student) or config.stages[-1].name
    print(
        "next:\n"
        f"  recdistill report --run {args.out}\n"
        f"  recdistill export --run {args.out} --model {student} --out artifacts/{student}"
    )


def _sweep(args: argparse.Namespace) -> None:
    from recdistill.sweep import run_sweep
    from recdistill.sweep.report import candidates_table

    summary = run_sweep(
        args.config, args.data, args.out, jobs=args.jobs, track=args.track, device=args.device
    )
    print(candidates_table(summary))
    layout = SweepLayout(args.out)
    print(f"\nwrote {layout.summary} and {layout.report.index}")


def _report(args: argparse.Namespace) -> None:
    from recdistill.api import report

    page = report(args.run, min_users=args.min_users, retention_threshold=args.retention_threshold)
    print(f"wrote {page}")


def _export(args: argparse.Namespace) -> None:
    from recdistill.api import export
    from recdistill.layout import OnnxLayout
    from recdistill.manifest import read_manifest

    out = export(args.run, args.model, args.out, data=args.data, format=args.format)
    if args.format == "onnx":
        print(
            f"wrote {out}: {args.model} as ONNX; its [teachers.*] table: {OnnxLayout(out).teacher}"
        )
        return
    manifest = read_manifest(out)
    print(
        f"wrote {out}: {manifest.name} ({manifest.kind}), "
        f"version {manifest.version}, {manifest.params:,} parameters"
    )


def _serve(args: argparse.Namespace) -> None:
    import os
    import socket

    import uvicorn

    from recdistill.artifact import load_artifact

    settings = ServerSettings(
        artifacts=tuple(str(path) for path in args.artifact),
        ab_config=None if args.ab is None else str(args.ab),
        impressions=str(args.impressions.resolve()),
        events=None if args.events is None else str(args.events.resolve()),
        max_candidates=args.max_candidates,
        max_body_bytes=args.max_body_bytes,
        threads=args.threads,
        precompute_items=args.precompute_items,
        inference=args.inference,
        user_cache=args.user_cache,
        artifact_root=None if args.artifact_root is None else str(args.artifact_root),
    )
    # Bad artifacts or arms fail here, with their message, rather than inside a worker.
    routing_for(settings, {load_artifact(path).name for path in args.artifact})
    log = Path(settings.impressions)
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"impression log {log}: cannot create its folder: {error}") from None
    # A port in use is said before anything claims to serve on it.
    try:
        socket.create_server((args.host, args.port)).close()
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise ValueError(f"cannot serve on {args.host}:{args.port}: {reason}") from None
    os.environ[SETTINGS_ENV] = settings.to_json()
    # Flushed: stdout is block-buffered when it is a file, and these are start-up news.
    print(f"serving {len(args.artifact)} artifact(s) on http://{args.host}:{args.port}")
    print(f"impressions: appending to {log}")
    print(f"events (POST /feedback): appending to {settings.event_log}", flush=True)
    uvicorn.run(
        "serving.app:app_from_environment",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


def _overridden(spec: Spec, **options: Any) -> Spec:
    """``spec`` with the options given on the command line (those not None)."""
    return dataclasses.replace(spec, **{k: v for k, v in options.items() if v is not None})


def _abtest(args: argparse.Namespace) -> None:
    from recdistill.abtest.experiment import run_abtest

    if args.config is None or args.out is None:
        raise ValueError("abtest needs --config and --out (or: abtest analyze ...)")
    result = run_abtest(args.config, args.out, mode=args.mode, seed=args.seed, device=args.device)
    print(result.summary())
    print(f"\nwrote {result.report}")


def _abtest_analyze(args: argparse.Namespace) -> None:
    from recdistill.abtest.live import analyze_logs

    result = analyze_logs(
        args.config,
        args.out,
        impressions=args.impressions,
        events=args.events,
        events_from=args.events_from,
        data=args.data,
    )
    print(result.summary())
    print(f"\nwrote {result.report}")


if __name__ == "__main__":
    sys.exit(main())
