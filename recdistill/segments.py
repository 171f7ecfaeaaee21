"""Every metric per user segment, with bootstrap CIs, retention and paired tests.

A slice is one value of one segment column (``activity_tier = cold``, ``gender = F``, the
held-out item's ``popularity_tier = tail`` or one of its categories (the items table's
``genres``: ``held_out_category = Drama``), or ``all``); an item of two categories puts its
user in both categories' slices. Slices smaller than
``min_users`` are left out. For each slice and model: the mean of each metric with its
bootstrap CI over users; for NDCG@10, the retention against the teacher with its paired
bootstrap CI, and paired tests against the teacher and against the student's labels-only
twin (t-test and randomization test; the run's roles say which models those are),
Holm-corrected across the slices of each comparison.

A slice is flagged when the model keeps significantly less of the teacher's quality there
than it does overall: its retention is below the model's own overall retention, and the
delta-method test of the slice's retention against the other users' rejects at ``1 - level``
after Holm across the model's slices. ``retention_threshold`` is what the model's overall
retention is held to.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from recdistill.data.prepare import ACTIVITY_TIERS, POPULARITY_TIERS
from recdistill.data.tables import read_meta
from recdistill.layout import DataLayout
from recdistill.roles import REFERENCE, SCRATCH
from recdistill.stats import (
    bootstrap_mean_ci,
    bootstrap_ratio_ci,
    holm,
    paired_t_test,
    randomization_test,
    ratio_difference_test,
)

ALL = "all"
HELD_OUT_TIER = "held_out_popularity_tier"
HELD_OUT_CATEGORY = "held_out_category"
_TIER_RANK = {tier: rank for rank, tier in enumerate((*ACTIVITY_TIERS, *POPULARITY_TIERS))}


@dataclass(frozen=True)
class SliceSpec:
    metrics: tuple[str, ...] | None = None  # None: every metric column of per_user
    key_metric: str = "ndcg@10"
    min_users: int = 30
    retention_threshold: float = 0.95
    level: float = 0.95
    replicates: int = 1000
    permutations: int = 2000
    seed: int = 0


def user_segments(data: Path, split: str = "test", *, categories: bool = False) -> pd.DataFrame:
    """Per evaluated user, the value of every segment column (as strings), by ``user_id``;
    with ``categories``, also the held-out item's categories (a tuple: the user is in each
    one's slice)."""
    layout = DataLayout(Path(data))
    meta = read_meta(layout.root)
    users = pq.read_table(layout.users).to_pandas().set_index("user_id")
    segments = users[meta["user_segments"]].astype(str)
    held_out = pq.read_table(layout.split(split)).to_pandas().set_index("user_id")["item_id"]
    items = pq.read_table(layout.items).to_pandas().set_index("item_id")
    segments[HELD_OUT_TIER] = held_out.map(items["popularity_tier"])
    if categories:
        segments[HELD_OUT_CATEGORY] = held_out.map(items["genres"].map(tuple))
    return segments.loc[held_out.index]


def slice_table(
    per_user: pd.DataFrame,
    segments: pd.DataFrame,
    spec: SliceSpec,
    references: dict[str, str | None],
) -> pd.DataFrame:
    """One row per (segment, value, model, metric) with mean, CI, retention and tests.

    ``references`` names the models playing each role (``REFERENCE``, ``SCRATCH``); the test
    columns are named by role (``p_t_vs_reference``, ...)."""
    metrics = spec.metrics or tuple(c for c in per_user.columns if c not in ("model", "user_id"))
    wide = {
        metric: per_user.pivot(index="user_id", columns="model", values=metric)
        for metric in metrics
    }
    users = wide[spec.key_metric].index
    segments = segments.reindex(users)
    slices = [(ALL, ALL, np.ones(len(users), dtype=bool))]
    for column in segments.columns:
        for value, chosen in _members(segments[column]):
            if chosen.sum() >= spec.min_users:
                slices.append((column, value, chosen))

    rows = []
    models = list(wide[spec.key_metric].columns)
    for segment, value, chosen in slices:
        for model in models:
            for metric in metrics:
                values = wide[metric][model].to_numpy()[chosen]
                values = values[~np.isnan(values)]  # e.g. teacher fidelity of the teacher
                if len(values) == 0:
                    continue
                low, high = bootstrap_mean_ci(
                    values, level=spec.level, replicates=spec.replicates, seed=spec.seed
                )
                row = {
                    "segment": segment,
                    "value": value,
                    "model": model,
                    "metric": metric,
                    "users": int(chosen.sum()),
                    "mean": float(values.mean()),
                    "ci_low": low,
                    "ci_high": high,
                }
                if metric == spec.key_metric:
                    row |= _against_references(wide[metric], model, chosen, spec, references)
                rows.append(row)
    table = pd.DataFrame(rows)
    for role in (REFERENCE, SCRATCH):
        for test in ("t", "randomization"):
            column = f"p_{test}_vs_{role}"
            if column not in table:  # a run without this reference: its tests are blank
                table[column] = table[f"{column}_holm"] = np.nan
                continue
            for (model, metric), group in table.groupby(["model", "metric"]):
                table.loc[group.index, f"{column}_holm"] = holm(group[column].to_numpy())
    if "retention" not in table:  # no reference among the models
        table["retention"] = table["retention_ci_low"] = table["retention_ci_high"] = np.nan
        table["p_vs_rest"] = np.nan
    for model, group in table.groupby("model"):
        table.loc[group.index, "p_vs_rest_holm"] = holm(group["p_vs_rest"].to_numpy())
    key = table[(table["segment"] == ALL) & (table["metric"] == spec.key_metric)]
    overall = table["model"].map(key.set_index("model")["retention"])
    table["flagged"] = (table["p_vs_rest_holm"] <= 1 - spec.level) & (table["retention"] < overall)
    return table


def natural_order(value: str) -> tuple[int, float, str]:
    """Sort key of segment values: tiers as they rise (cold, light, medium, heavy; head,
    torso, tail), then by the first number in the value ("<18" before "18-24" before
    "56+"), then by name."""
    if value in _TIER_RANK:
        return (0, _TIER_RANK[value], value)
    number = re.search(r"\d+(\.\d+)?", value)
    if number is None:
        return (1, math.inf, value)
    return (1, float(number.group()) - 0.5 * value.lstrip().startswith("<"), value)


def _members(column: pd.Series) -> list[tuple[str, np.ndarray]]:
    """Each value of a segment column and who has it; a user whose value is a tuple (the
    held-out item's genres) has each of its values."""
    sets = column.map(lambda v: set(v) if isinstance(v, tuple) else {v} if pd.notna(v) else set())
    values = sorted(set().union(*sets), key=natural_order)
    return [(value, np.array([value in held for held in sets])) for value in values]


def _against_references(
    frame: pd.DataFrame,
    model: str,
    chosen: np.ndarray,
    spec: SliceSpec,
    references: dict[str, str | None],
) -> dict[str, float]:
    result: dict[str, float] = {}
    values = frame[model].to_numpy()[chosen]
    for role, reference in references.items():
        if reference not in frame or reference == model:
            continue
        other = frame[reference].to_numpy()[chosen]
        result[f"p_t_vs_{role}"] = paired_t_test(values, other)
        result[f"p_randomization_vs_{role}"] = randomization_test(
            values, other, permutations=spec.permutations, seed=spec.seed
        )
        if role == REFERENCE:
            # Undefined (not infinite) where the teacher scores nothing in the slice.
            result["retention"] = float(values.mean() / other.mean()) if other.mean() else np.nan
            low, high = bootstrap_ratio_ci(
                values, other, level=spec.level, replicates=spec.replicates, seed=spec.seed
            )
            result["retention_ci_low"], result["retention_ci_high"] = low, high
            rest = ~chosen
            result["p_vs_rest"] = ratio_difference_test(
                values, other, frame[model].to_numpy()[rest], frame[reference].to_numpy()[rest]
            )
    return result
