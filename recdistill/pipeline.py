"""The staged run: teacher → intermediate → student, the baselines, and ``summary.json``.

Stages run in config order; a stage may learn from any earlier stage. After training, every
model and the reference baselines are scored on the same test candidate lists and on full
ranking, and the run's claims (retention, distillation gain) are tested over users.

Under ``torchrun`` every rank trains every stage together; rank 0 alone scores, writes the
run's files and hands the summary to the others.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.numpy import save_file
from scipy import stats

from recdistill import devices, distributed, tracking
from recdistill.baselines import Ease, Popularity
from recdistill.config import RunConfig
from recdistill.data.feature_store import FeatureStore
from recdistill.data.tables import read_meta
from recdistill.ensembles import BASELINE_MEMBERS, EaseMember, EnsembleSpec, EnsembleTeacher
from recdistill.errors import TeacherError
from recdistill.evaluate import (
    ScoredLists,
    evaluate,
    mean_metrics,
    score_lists,
    scoring_latency_ms,
)
from recdistill.external.load import load_teacher
from recdistill.files import atomic_write
from recdistill.layout import RunLayout
from recdistill.metrics import coverage_at
from recdistill.recipe import train_stage
from recdistill.roles import Roles
from recdistill.stage import VALID_METRICS
from recdistill.summary import (
    BaselineModel,
    Comparison,
    EnsembleModel,
    ExternalModel,
    Latency,
    MultiplyAdds,
    RunSummary,
    TrainedModel,
    Training,
    from_json,
    to_json,
    write_summary,
)
from recdistill.teachers import FrozenTeacher, Teacher

Tuned = TypeVar("Tuned")
Entry = TrainedModel | EnsembleModel | BaselineModel | ExternalModel


def run(
    config: RunConfig,
    data: Path,
    out: Path,
    *,
    resume: bool = False,
    teachers: dict[str, Any] | None = None,
) -> RunSummary:
    """Train every stage of ``config`` on ``data`` into run directory ``out``, score every
    model and write ``summary.json``; ``resume`` continues from the stages' checkpoints.
    ``teachers`` hands over the objects of ``[teachers.*]`` tables that come from Python.
    With ``[tracking]`` on, the run is logged to MLflow as it goes (:mod:`recdistill.tracking`).

    Teachers from outside the run are loaded and tried before anything is written: one that
    cannot teach stops the run with a :class:`~recdistill.errors.TeacherError`, and one that
    fails later (a non-finite score) takes the run directory it was training into with it.
    """
    if not config.stages:
        raise ValueError("the config has no [stages.*] tables")
    world = distributed.world()
    layout = RunLayout(Path(out))
    if not resume and layout.has_checkpoints():
        raise ValueError(f"{out} already holds a run; pass --resume to continue it")
    meta = read_meta(data)
    store = FeatureStore(data, history_length=config.history_length)
    external = _external_teachers(config, store, layout, teachers or {})
    fresh = not layout.root.exists()
    layout.root.mkdir(parents=True, exist_ok=True)
    try:
        return _run(config, data, layout, store, meta, external, resume=resume)
    except TeacherError:
        if fresh and world.is_main:
            shutil.rmtree(layout.root, ignore_errors=True)
        raise


def _run(
    config: RunConfig,
    data: Path,
    layout: RunLayout,
    store: FeatureStore,
    meta: dict[str, Any],
    external: dict[str, Teacher],
    *,
    resume: bool,
) -> RunSummary:
    world = distributed.world()
    if world.is_main:
        atomic_write(layout.config, lambda path: path.write_text(config.to_toml()))
    with tracking.tracked_run(config.tracking, layout, layout.config, resume=resume) as tracker:
        devices.announce(world.device)
        # Fitted when an ensemble needs them as members, else once training is over.
        baselines = cache(partial(fit_baselines, store, config))

        # Every model scored on test: the teachers from outside that can be, the stages, the
        # ensembles and (once trained) the baselines.
        models: dict[str, Any] = {
            name: t for name, t in external.items() if config.teachers[name].scorable
        }
        # A trained stage, frozen once as the teacher of every later stage that learns from it,
        # each ensemble, built once from its trained members, and the teachers from outside.
        frozen: dict[str, Teacher] = dict(external)
        # Each model's summary entry, waiting for its test metrics and latency.
        entries: dict[str, Callable[..., Entry]] = {
            name: partial(
                ExternalModel,
                kind=config.teachers[name].kind,
                params=teacher.params,
                note=teacher.describe(),
            )
            for name, teacher in external.items()
        }

        def teacher(name: str) -> Teacher:
            if name not in frozen:
                directory = layout.stage(name).root
                if name in config.ensembles:
                    spec = config.ensembles[name]
                    members = {
                        m: EaseMember.of(baselines()[0][m]) if m in BASELINE_MEMBERS else teacher(m)
                        for m in spec.members
                    }
                    frozen[name], entries[name] = choose_ensemble(
                        spec, members, store, config.train.valid_metric, directory
                    )
                else:
                    frozen[name] = FrozenTeacher(name, models[name], store, cache=directory)
            return frozen[name]

        for number, stage in enumerate(config.stages, start=1):
            teachers = {name: teacher(name) for name in stage.teachers}
            model, result = train_stage(
                stage,
                config.models[stage.model],
                teachers,
                store,
                layout.stage(stage.name).root,
                resume=resume,
                place=f"stage {number} of {len(config.stages)}",
            )
            models[stage.name] = model
            training = Training(
                teachers=list(stage.teachers),
                losses=[term.describe() for term in stage.losses],
                lists=stage.lists,
                best_epoch=result.best_epoch,
                epochs_run=result.epochs_run,
                valid_metric=stage.valid_metric,
                valid=result.valid,
                train_seconds=result.seconds,
                examples_per_second=result.examples_per_second,
            )
            entries[stage.name] = partial(
                TrainedModel,
                preset=stage.model,
                params=model.parameter_count(),
                multiply_adds=MultiplyAdds(**model.multiply_adds(meta["list_size"])),
                training=training,
            )
            if tracker is not None:
                stage_layout = layout.stage(stage.name)
                tracking.log_stage(tracker, stage, config.models[stage.model], stage_layout)
        for name in config.ensembles:
            models[name] = teacher(name)

        summary = None
        if world.is_main:
            fitted, fitted_entries = baselines()
            models |= fitted
            entries |= fitted_entries
            scored, comparisons = _score_and_write(models, entries, store, layout, config.roles)
            # A log of scores ranked no test list: in the summary without metrics.
            unscored = {
                n: entries[n](metrics={}, latency_ms=None) for n in entries if n not in scored
            }
            summary = RunSummary(str(data), meta["source"], scored | unscored, comparisons)
            write_summary(layout.summary, summary)
            if tracker is not None:
                tracking.log_run(tracker, layout, summary)
    shared = distributed.broadcast_json(None if summary is None else to_json(summary), world)
    return from_json(RunSummary, shared)


def _external_teachers(
    config: RunConfig, store: FeatureStore, layout: RunLayout, given: dict[str, Any]
) -> dict[str, Teacher]:
    """The run's ``[teachers.*]``, each loaded and tried on a few lists; a feature loss from
    one that gives no vectors is refused here, before anything is written."""
    unknown = sorted(set(given) - set(config.teachers))
    if unknown:
        raise TeacherError(
            f"teachers {unknown} were handed over, but the config has no [teachers.*] table for "
            f'them: add [teachers.NAME] kind = "python" (or "torch")'
        )
    external = {}
    for name, spec in config.teachers.items():
        external[name] = load_teacher(
            spec, store, given=given.get(name), cache=layout.stage(name).root
        )
        print(external[name].describe(), flush=True)
    for stage in config.stages:
        for term in stage.losses:
            source = external.get(term.source)
            if (
                term.fn == "feature_mse"
                and source is not None
                and not hasattr(source, "output_dim")
            ):
                raise TeacherError(
                    f"[stages.{stage.name}]: feature_mse needs {term.source!r}'s vectors; "
                    "it gives scores alone"
                )
    return external


def fit_baselines(
    store: FeatureStore, config: RunConfig
) -> tuple[dict[str, Any], dict[str, Callable[..., BaselineModel]]]:
    """Popularity and the two EASE baselines, their settings chosen on the run's validation
    metric, each scoring from the test-time histories; and their summary entries."""
    metric = config.train.valid_metric
    ease = _best_on_valid(
        store, config.baselines.ease_l2, lambda l2: Ease.fit(store, float(l2)), metric
    )
    recency = _best_on_valid(
        store,
        config.baselines.half_lives,
        lambda half_life: ease.scoring(store, float(half_life)),
        metric,
    )
    # Tuned on validation histories; the test lists are scored from the test-time ones.
    tested = store.known_at("test")
    models = {
        "popularity": Popularity(store),
        "ease": ease.scoring(tested),
        "ease_recency": recency.scoring(tested),
    }
    entries = {
        "popularity": partial(BaselineModel, params=0),
        "ease": partial(BaselineModel, params=len(store.items) ** 2, l2=ease.l2),
        "ease_recency": partial(
            BaselineModel,
            params=len(store.items) ** 2,
            l2=recency.l2,
            half_life=recency.half_life,
        ),
    }
    return models, entries


def choose_ensemble(
    spec: EnsembleSpec,
    members: dict[str, Any],
    store: FeatureStore,
    metric: str,
    cache: Path | None,
) -> tuple[EnsembleTeacher, Callable[..., EnsembleModel]]:
    """The ensemble at the weights of ``spec.grid`` with the best validation ``metric`` (the
    first of equals), and its summary entry. Under ``torchrun`` rank 0 scores the grid and
    every rank takes its choice."""
    world = distributed.world()
    tried = []
    if world.is_main:
        for weights in spec.grid:
            candidate = EnsembleTeacher(spec.name, members, weights, store)
            valid = mean_metrics(evaluate(candidate, store, "valid", name=spec.name))
            tried.append({name: valid[name] for name in VALID_METRICS})
            mix = "  ".join(f"{name} {w:g}" for name, w in candidate.weights.items())
            print(
                f"{spec.name} [{mix}]: valid ndcg@10 {valid['ndcg@10']:.4f}  "
                f"full_ndcg@10 {valid['full_ndcg@10']:.4f}",
                flush=True,
            )
    tried = distributed.broadcast_json(tried, world)
    chosen = max(range(len(tried)), key=lambda k: (tried[k][metric], -k))
    best = EnsembleTeacher(spec.name, members, spec.grid[chosen], store, cache=cache)
    params = sum(
        len(store.items) ** 2 if name in BASELINE_MEMBERS else members[name].params or 0
        for name in spec.members
    )
    entry = partial(EnsembleModel, weights=best.weights, params=params, valid=tried[chosen])
    return best, entry


def _score_and_write(
    models: dict[str, Any],
    entries: dict[str, Callable[..., Entry]],
    store: FeatureStore,
    layout: RunLayout,
    roles: Roles,
) -> tuple[dict[str, Entry], dict[str, Comparison]]:
    """Score every model on the test lists and write the per-user metrics and scores;
    returns the summary's models and the comparisons of ``roles``."""
    scored = {name: score_lists(model, store, "test") for name, model in models.items()}
    teacher = scored.get(roles.reference)
    per_user, summarised = {}, {}
    for name, model in models.items():
        reference = None if name == roles.reference else teacher
        per_user[name] = evaluate(
            model, store, "test", scored=scored[name], reference=reference, name=name
        )
        metrics = mean_metrics(per_user[name])
        metrics["coverage@10"] = coverage_at(
            scored[name].scores, scored[name].items, len(store.items) - 1, 10
        )
        latency = Latency(**scoring_latency_ms(model, store, "test"))
        summarised[name] = entries[name](metrics=metrics, latency_ms=latency)
    _write_per_user(per_user, layout.per_user)
    _write_scores(scored, store, layout.scores)
    return summarised, _comparisons(per_user, roles.comparisons)


def _best_on_valid(
    store: FeatureStore, grid: tuple[float, ...], build: Callable[[float], Tuned], metric: str
) -> Tuned:
    """The ranker of ``grid`` with the best validation ``metric`` (never looks at test); the
    first of equals wins.

    Only the best ranker so far is kept beside the one being scored.
    """
    best, best_score = None, -np.inf
    for value in grid:
        ranker = build(value)
        valid = evaluate(ranker, store, "valid", full_ranking=metric != "ndcg@10")
        score = float(valid[metric].mean())
        if best is None or score > best_score:
            best, best_score = ranker, score
        del ranker
    return best


def _comparisons(
    per_user: dict[str, dict[str, np.ndarray]], pairs: tuple[tuple[str, str], ...]
) -> dict[str, Comparison]:
    """Relative NDCG@10 (sampled and full) and a paired t-test over users, per pair."""
    result = {}
    for model, reference in pairs:
        if model not in per_user or reference not in per_user:
            continue
        measured = []
        for metric in ("ndcg@10", "full_ndcg@10"):
            a, b = per_user[model][metric], per_user[reference][metric]
            measured += [float(a.mean() / b.mean()), float(stats.ttest_rel(a, b).pvalue)]
        result[f"{model}_vs_{reference}"] = Comparison(*measured)
    return result


def _write_scores(scored: dict[str, ScoredLists], store: FeatureStore, path: Path) -> None:
    """Every model's scores on the test lists, for analyses after the fact."""
    first = next(iter(scored.values()))
    tensors = {
        "user_id": store.users.values[first.users - 1],
        "candidates": store.items.values[first.items - 1],
    }
    tensors |= {name: lists.scores for name, lists in scored.items()}
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))


def _write_per_user(per_user: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    tables = [
        pa.table({"model": [name] * len(metrics["user_id"]), **metrics})
        for name, metrics in per_user.items()
    ]
    pq.write_table(pa.concat_tables(tables, promote_options="default"), path)


def summary_table(summary: RunSummary) -> str:
    """The run's models side by side, as printed at the end of ``recdistill train``."""
    header = (
        f"{'model':<16}{'params':>11}{'MACs/cand':>11}{'ndcg@10':>9}{'hr@10':>8}{'mrr':>8}"
        f"{'full_ndcg@10':>14}{'full_rec@10':>13}{'train ex/s':>12}"
    )
    lines = [header]
    for name, entry in summary.models.items():
        metrics = entry.metrics
        macs, speed = "", ""
        if isinstance(entry, TrainedModel):
            macs = f"{entry.multiply_adds.per_candidate:,.0f}"
            speed = f"{entry.training.examples_per_second:,.0f}"
        params = "" if entry.params is None else f"{entry.params:,}"
        if not metrics:  # a log of scores: it ranked no test list
            lines.append(f"{name:<16}{params:>11}{macs:>11}  (logged scores: no test lists)")
            continue
        lines.append(
            f"{name:<16}{params:>11}{macs:>11}"
            f"{metrics['ndcg@10']:>9.4f}{metrics['hr@10']:>8.4f}{metrics['mrr']:>8.4f}"
            f"{metrics['full_ndcg@10']:>14.4f}{metrics['full_recall@10']:>13.4f}{speed:>12}"
        )
    lines.append("")
    for pair, entry in summary.comparisons.items():
        lines.append(
            f"{pair:<32} ndcg@10 ×{entry.ndcg_ratio:.3f} (p={entry.ndcg_p_value:.2g})"
            f"  full ×{entry.full_ndcg_ratio:.3f} (p={entry.full_ndcg_p_value:.2g})"
        )
    return "\n".join(lines)
