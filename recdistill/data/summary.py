"""A plain-text summary of a prepared data directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recdistill.data.prepare import ACTIVITY_TIERS, POPULARITY_TIERS
from recdistill.data.tables import read_meta
from recdistill.layout import DataLayout


def describe(directory: Path) -> str:
    directory = Path(directory)
    meta = read_meta(directory)
    layout = DataLayout(directory)
    users = pq.read_table(layout.users)
    items = pq.read_table(layout.items)
    splits = meta["splits"]
    n_train = users.column("n_train").to_numpy()
    # Repeated events of a pair count once: the split keeps each pair's latest.
    repeats = meta["duplicate_pairs_dropped"]
    pairs = meta["n_interactions"] - repeats
    density = pairs / (meta["n_users"] * meta["n_items"])
    read = f" ({meta['n_interactions']:,} rows, {repeats:,} repeats dropped)" if repeats else ""
    lines = [
        f"{directory}  (source: {meta['source']})",
        (
            f"  users {meta['n_users']:,}  items {meta['n_items']:,}  "
            f"interactions {pairs:,}{read}  density {density:.2%}"
        ),
        (
            f"  split: train {splits['train']:,}  valid {splits['valid']:,}  "
            f"test {splits['test']:,}  ({meta['users_evaluated']:,} users evaluated, "
            f"{meta['list_size']} candidates per list)"
        ),
        (
            f"  train interactions per user: min {n_train.min()}  "
            f"median {np.median(n_train):g}  mean {n_train.mean():.1f}  max {n_train.max()}"
        ),
        "  user segments:",
    ]
    for column in meta["user_segments"]:
        lines.append(f"    {column:<14}" + _shares(users.column(column)))
    item_train = items.column("n_train").to_numpy()
    tiers = items.column("popularity_tier").to_numpy(zero_copy_only=False)
    parts = []
    for tier in POPULARITY_TIERS:
        chosen = tiers == tier
        share = item_train[chosen].sum() / max(item_train.sum(), 1)
        parts.append(f"{tier} {chosen.sum():,} items ({share:.0%} of train)")
    lines.append("  item popularity tiers: " + "  ".join(parts))
    return "\n".join(lines)


def _shares(column) -> str:
    counts = pc.value_counts(column.cast("string")).to_pylist()
    order = {tier: rank for rank, tier in enumerate(ACTIVITY_TIERS)}
    counts.sort(key=lambda entry: (order.get(entry["values"], len(order)), str(entry["values"])))
    total = sum(entry["counts"] for entry in counts)
    return "  ".join(
        f"{entry['values']} {entry['counts']:,} ({entry['counts'] / total:.0%})" for entry in counts
    )
