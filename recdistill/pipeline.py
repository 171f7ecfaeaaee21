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
import torch
from safetensors.numpy import save_file
from scipy import stats

from recdistill import distributed
from recdistill.baselines import Ease, Popularity
from recdistill.config import HISTORY_LENGTH, history_length, load_config, section, spec_from
from recdistill.data.feature_store import FeatureStore
from recdistill.data.tables import read_meta
from recdistill.ensembles import BASELINE_MEMBERS, EaseMember, EnsembleSpec, EnsembleTeacher
from recdistill.evaluate import (
    ScoredLists,
    evaluate,
    mean_metrics,
    score_lists,
    scoring_latency_ms,
)
from recdistill.layout import RunLayout
from recdistill.metrics import coverage_at
from recdistill.models import FeatureSpace, TwoTower, TwoTowerSpec
from recdistill.stage import VALID_METRICS, LossTerm, StageSpec
from recdistill.summary import (
    BaselineModel,
    Comparison,
    EnsembleModel,
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
from recdistill.train import Trainer

STAGE_KEYS = {f.name for f in StageSpec.__dataclass_fields__.values()} - {"name", "losses"}
# Grids searched on validation NDCG@10 when the config's [baselines.*] tables give none.
EASE_L2 = [100.0, 300.0, 1000.0]
EASE_HALF_LIVES = [1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0]  # in items of the user's history
# (model, reference) pairs whose per-user NDCG@10 is compared in summary.json.
COMPARISONS = (
    ("student", "teacher"),
    ("student", "student_scratch"),
    ("teacher", "student_scratch"),
    ("student", "student_direct"),
    ("intermediate", "teacher"),
    ("teacher", "ease"),
    ("teacher", "ease_recency"),
    ("student", "ease_recency"),
    ("teacher", "popularity"),
)
Tuned = TypeVar("Tuned")


def model_presets(config: dict[str, Any]) -> dict[str, TwoTowerSpec]:
    """The config's ``[models.*]`` specs; a bad one is an error that names its table."""
    presets = {}
    for name, table in section(config, "models").items():
        try:
            presets[name] = spec_from(TwoTowerSpec, table, f"[models.{name}]")
        except ValueError as error:
            where = f"[models.{name}]"
            raise ValueError(str(error) if str(error).startswith(where) else f"{where}: {error}")
    return presets


def stages_from(config: dict[str, Any]) -> list[StageSpec]:
    train = section(config, "train")
    unknown = sorted(set(train) - STAGE_KEYS - {HISTORY_LENGTH})
    if unknown:
        raise ValueError(
            f"[train]: unknown key(s) {unknown}; valid keys are "
            f"{sorted(STAGE_KEYS | {HISTORY_LENGTH})}"
        )
    defaults = {k: v for k, v in train.items() if k in STAGE_KEYS}
    stages = []
    for name, table in section(config, "stages").items():
        table = dict(table)
        terms = []
        for term in table.pop("losses", []):
            term = dict(term)
            fixed = {k: term.pop(k) for k in ("fn", "source", "weight") if k in term}
            try:
                terms.append(LossTerm(**fixed, options=term))
            except ValueError as error:
                raise ValueError(f"[stages.{name}]: {error}") from error
        if not terms:
            raise ValueError(f"[stages.{name}] has no losses")
        stages.append(
            spec_from(
                StageSpec, {**defaults, **table}, f"[stages.{name}]", name=name, losses=tuple(terms)
            )
        )
    if not stages:
        raise ValueError("the config has no [stages.*] tables")
    return stages


def ensembles_from(config: dict[str, Any]) -> list[EnsembleSpec]:
    """The config's ``[ensembles.*]`` specs."""
    return [
        spec_from(EnsembleSpec, dict(table), f"[ensembles.{name}]", name=name)
        for name, table in section(config, "ensembles").items()
    ]


def run(config_path: Path, data: Path, out: Path, *, resume: bool = False) -> RunSummary:
    config = load_config(config_path)
    world = distributed.world()
    layout = RunLayout(Path(out))
    if not resume and layout.has_checkpoints():
        raise ValueError(f"{out} already holds a run; pass --resume to continue it")
    presets = model_presets(config)
    stages = stages_from(config)
    ensembles = {spec.name: spec for spec in ensembles_from(config)}
    length = history_length(config)
    _check_stages(stages, presets, length, ensembles)
    meta = read_meta(data)
    store = FeatureStore(data, history_length=length)
    space = FeatureSpace(store.user_features, store.cardinalities())
    layout.root.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        shutil.copyfile(config_path, layout.config)
    metric = section(config, "train").get("valid_metric", VALID_METRICS[0])
    # Fitted when an ensemble needs them as members, else once training is over.
    baselines = cache(partial(fit_baselines, store, config, metric))

    models: dict[str, Any] = {}
    # A trained stage, frozen once as the teacher of every later stage that learns from it,
    # and each ensemble, built once from its trained members.
    frozen: dict[str, Teacher] = {}
    # Each model's summary entry, waiting for its test metrics and latency.
    entries: dict[str, Callable[..., TrainedModel | EnsembleModel | BaselineModel]] = {}

    def teacher(name: str) -> Teacher:
        if name not in frozen:
            directory = layout.stage(name).root
            if name in ensembles:
                spec = ensembles[name]
                members = {
                    m: EaseMember.of(baselines()[0][m]) if m in BASELINE_MEMBERS else teacher(m)
                    for m in spec.members
                }
                frozen[name], entries[name] = choose_ensemble(
                    spec, members, models, store, metric, directory
                )
            else:
                frozen[name] = FrozenTeacher(name, models[name], store, cache=directory)
        return frozen[name]

    for stage in stages:
        teachers = {name: teacher(name) for name in stage.teachers}
        torch.manual_seed(stage.seed)
        model = TwoTower(presets[stage.model], space)
        trainer = Trainer(stage, model, teachers, store, layout.stage(stage.name).root)
        result = trainer.fit(resume=resume)
        models[stage.name] = model
        training = Training(
            teachers=list(stage.teachers),
            losses=[f"{t.weight:g}·{t.fn}({t.source})" for t in stage.losses],
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
    for name in ensembles:
        models[name] = teacher(name)

    summary = None
    if world.is_main:
        fitted, fitted_entries = baselines()
        models |= fitted
        entries |= fitted_entries
        pairs = (
            COMPARISONS
            + tuple((name, member) for name, spec in ensembles.items() for member in spec.members)
            + tuple(
                (stage.name, name)
                for stage in stages
                for name in stage.teachers
                if name in ensembles
            )
        )
        scored, comparisons = _score_and_write(models, entries, store, layout, pairs)
        summary = RunSummary(str(data), meta["source"], scored, comparisons)
        write_summary(layout.summary, summary)
    shared = distributed.broadcast_json(None if summary is None else to_json(summary), world)
    return from_json(RunSummary, shared)


def fit_baselines(
    store: FeatureStore, config: dict[str, Any], metric: str
) -> tuple[dict[str, Any], dict[str, Callable[..., BaselineModel]]]:
    """Popularity and the two EASE baselines, their settings chosen on validation ``metric``,
    each scoring from the test-time histories; and their summary entries."""
    ease = _best_on_valid(
        store,
        section(config, "baselines.ease").get("l2", EASE_L2),
        lambda l2: Ease.fit(store, float(l2)),
        metric,
    )
    recency = _best_on_valid(
        store,
        section(config, "baselines.ease_recency").get("half_life", EASE_HALF_LIVES),
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
    models: dict[str, Any],
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
        models[name].parameter_count() if name in models else len(store.items) ** 2
        for name in spec.members
    )
    entry = partial(EnsembleModel, weights=best.weights, params=params, valid=tried[chosen])
    return best, entry


def _score_and_write(
    models: dict[str, Any],
    entries: dict[str, Callable[..., TrainedModel | EnsembleModel | BaselineModel]],
    store: FeatureStore,
    layout: RunLayout,
    pairs: tuple[tuple[str, str], ...],
) -> tuple[dict[str, TrainedModel | EnsembleModel | BaselineModel], dict[str, Comparison]]:
    """Score every model on the test lists and write the per-user metrics and scores;
    returns the summary's models and the comparisons of ``pairs``."""
    scored = {name: score_lists(model, store, "test") for name, model in models.items()}
    teacher = scored.get("teacher")
    per_user, summarised = {}, {}
    for name, model in models.items():
        reference = None if name == "teacher" else teacher
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
    return summarised, _comparisons(per_user, pairs)


def _check_stages(
    stages: list[StageSpec],
    presets: dict[str, TwoTowerSpec],
    history_length: int,
    ensembles: dict[str, EnsembleSpec],
) -> None:
    """Fail before any training if a stage names an unknown preset or a later teacher, an
    ensemble a member the run does not have, or a stage asks of its model or its teacher
    what they cannot do."""
    names = {stage.name for stage in stages}
    for spec in ensembles.values():
        where = f"[ensembles.{spec.name}]"
        if spec.name in names | {"popularity", *BASELINE_MEMBERS}:
            raise ValueError(f"{where}: the run already has a model named {spec.name!r}")
        unknown = [m for m in spec.members if m not in names and m not in BASELINE_MEMBERS]
        if unknown:
            raise ValueError(
                f"{where}: unknown member(s) {unknown}; members are the run's stages and "
                f"the baselines {list(BASELINE_MEMBERS)}"
            )
    for name, preset in presets.items():
        if preset.is_sequence and preset.max_length > history_length:
            raise ValueError(
                f"[models.{name}] reads max_length = {preset.max_length} items, more than "
                f"[train] history_length = {history_length} keeps"
            )
    trained: set[str] = set()
    for stage in stages:
        if stage.model not in presets:
            raise ValueError(f"[stages.{stage.name}] uses unknown model preset {stage.model!r}")
        preset = presets[stage.model]
        if stage.objective == "next_item" and not (preset.is_sequence and preset.readout == "last"):
            raise ValueError(
                f"[stages.{stage.name}]: the next_item objective needs a sequence model read "
                f"out at its last position; [models.{stage.model}] is not one"
            )
        baselines = [t for t in stage.teachers if t in BASELINE_MEMBERS]
        if baselines:
            raise ValueError(
                f"[stages.{stage.name}] learns from {baselines}: a baseline teaches only as a "
                "member of an [ensembles.*] table"
            )
        needed = [
            member
            for t in stage.teachers
            for member in (ensembles[t].members if t in ensembles else (t,))
            if member not in BASELINE_MEMBERS
        ]
        missing = [t for t in dict.fromkeys(needed) if t not in trained]
        if missing:
            raise ValueError(f"[stages.{stage.name}] learns from {missing}, not trained before it")
        for term in stage.losses:
            if term.fn == "feature_mse" and term.source in ensembles:
                raise ValueError(
                    f"[stages.{stage.name}]: feature_mse needs tower outputs; the ensemble "
                    f"{term.source!r} has none"
                )
        trained.add(stage.name)


def _best_on_valid(
    store: FeatureStore, grid: list[float], build: Callable[[float], Tuned], metric: str
) -> Tuned:
    """The ranker of ``grid`` with the best validation ``metric`` (never looks at test); the
    first of equals wins.

    Only the best ranker so far is kept beside the one being scored.
    """
    if not grid:
        raise ValueError("a baseline's grid is empty")
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
        lines.append(
            f"{name:<16}{entry.params:>11,}{macs:>11}"
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
