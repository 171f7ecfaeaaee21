"""Leave-one-out splits, candidate lists and segments, shared by every data source."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recdistill.data.sampling import pair_keys, sample_unseen
from recdistill.data.tables import (
    INTERACTIONS,
    INTERACTIONS_SCHEMA,
    ITEMS,
    META,
    SPLITS,
    USERS,
    candidates_file,
    read_meta,
    rows_of_ids,
    split_file,
    write_json,
)

ACTIVITY_TIERS = ("cold", "light", "medium", "heavy")
POPULARITY_TIERS = ("head", "torso", "tail")
# A user needs one train, one validation and one test interaction to be evaluated.
MIN_INTERACTIONS = 3


@dataclass(frozen=True)
class SplitSpec:
    """How a data directory is split and segmented.

    ``activity_quantiles`` are the user quantiles of train counts that separate the
    cold / light / medium / heavy tiers; ``popularity_shares`` are the cumulative shares of
    train interactions covered by the head and by head + torso items (most popular first).
    """

    negatives: int = 99
    seed: int = 0
    activity_quantiles: tuple[float, float, float] = (0.1, 0.4, 0.8)
    popularity_shares: tuple[float, float] = (0.5, 0.8)

    def __post_init__(self) -> None:
        if self.negatives < 1:
            raise ValueError("negatives must be at least 1")
        if list(self.activity_quantiles) != sorted(self.activity_quantiles):
            raise ValueError("activity_quantiles must be increasing")
        if list(self.popularity_shares) != sorted(self.popularity_shares):
            raise ValueError("popularity_shares must be increasing")


def prepare(directory: Path, spec: SplitSpec) -> dict:
    """Split ``directory``'s interactions and add candidates and segments; returns the meta."""
    directory = Path(directory)
    meta = read_meta(directory)
    table = pq.read_table(directory / INTERACTIONS)
    users_table = pq.read_table(directory / USERS)
    items_table = pq.read_table(directory / ITEMS)
    user_ids = users_table.column("user_id").to_numpy()
    item_ids = items_table.column("item_id").to_numpy()

    user = table.column("user_id").to_numpy()
    item = table.column("item_id").to_numpy()
    timestamp = table.column("timestamp").to_numpy()
    rating = table.column("rating").to_numpy()
    del table
    n_total = len(user)

    order = np.lexsort((item, timestamp, user))
    user, item, timestamp, rating = user[order], item[order], timestamp[order], rating[order]
    del order
    last_of_pair = _last_of_each_pair(user, item)
    user, item, timestamp, rating = (
        user[last_of_pair],
        item[last_of_pair],
        timestamp[last_of_pair],
        rating[last_of_pair],
    )
    duplicates = n_total - len(user)

    user_row = rows_of_ids(user_ids, user, USERS)
    item_row = rows_of_ids(item_ids, item, ITEMS)
    counts = np.bincount(user_row, minlength=len(user_ids))
    from_end = np.cumsum(counts)[user_row] - 1 - np.arange(len(user))
    evaluated = counts[user_row] >= MIN_INTERACTIONS
    split_of = np.where(evaluated & (from_end == 0), 2, np.where(evaluated & (from_end == 1), 1, 0))

    def rows(split: int) -> dict[str, np.ndarray]:
        keep = split_of == split
        return {
            "user_id": user[keep],
            "item_id": item[keep],
            "timestamp": timestamp[keep],
            "rating": rating[keep],
        }

    sizes = {}
    for split, name in enumerate(SPLITS):
        part = rows(split)
        sizes[name] = len(part["user_id"])
        pq.write_table(pa.table(part, schema=INTERACTIONS_SCHEMA), directory / split_file(name))

    seen = np.sort(pair_keys(user_row, item_row, len(item_ids)))  # pairs are unique by now
    rng = np.random.default_rng(spec.seed)
    for split, name in ((1, "valid"), (2, "test")):
        held_out = split_of == split
        negatives = sample_unseen(user_row[held_out], spec.negatives, seen, len(item_ids), rng)
        candidates = np.concatenate([item_row[held_out, None], negatives], axis=1)
        list_size = candidates.shape[1]
        pq.write_table(
            pa.table(
                {
                    "user_id": user[held_out],
                    "item_id": item[held_out],
                    "candidates": pa.ListArray.from_arrays(
                        np.arange(0, candidates.size + 1, list_size),
                        item_ids[candidates.ravel()],
                    ),
                }
            ),
            directory / candidates_file(name),
        )

    train = split_of == 0
    user_train = np.bincount(user_row[train], minlength=len(user_ids))
    item_train = np.bincount(item_row[train], minlength=len(item_ids))
    activity_thresholds = np.quantile(
        user_train[counts >= MIN_INTERACTIONS], spec.activity_quantiles
    )
    activity = np.searchsorted(activity_thresholds, user_train, side="left")
    popularity = _popularity_tiers(item_train, item_ids, spec.popularity_shares)

    users_table = _replace_columns(
        users_table,
        {
            "n_train": pa.array(user_train),
            "activity_tier": pa.array(np.asarray(ACTIVITY_TIERS)[activity]),
        },
    )
    items_table = _replace_columns(
        items_table,
        {
            "n_train": pa.array(item_train),
            "popularity_tier": pa.array(np.asarray(POPULARITY_TIERS)[popularity]),
        },
    )
    pq.write_table(users_table, directory / USERS)
    pq.write_table(items_table, directory / ITEMS)

    meta.update(
        {
            "n_users": len(user_ids),
            "n_items": len(item_ids),
            "n_interactions": n_total,
            "duplicate_pairs_dropped": duplicates,
            "users_evaluated": int((counts >= MIN_INTERACTIONS).sum()),
            "splits": sizes,
            "list_size": spec.negatives + 1,
            "user_segments": [
                "activity_tier",
                *meta["user_features"],
                *meta.get("ground_truth_segments", []),
            ],
            "item_segments": ["popularity_tier"],
            "activity_thresholds": {
                tier: int(bound) for tier, bound in zip(ACTIVITY_TIERS, activity_thresholds)
            },
            "split_spec": dataclasses.asdict(spec),
        }
    )
    write_json(directory / META, meta)
    return meta


def _last_of_each_pair(user: np.ndarray, item: np.ndarray) -> np.ndarray:
    """Indices keeping only the latest interaction of each (user, item) pair, in order.

    Expects rows sorted by user then time, so a repeated item can never be both in a user's
    training history and held out.
    """
    order = np.lexsort((-np.arange(len(user)), item, user))
    first = np.ones(len(order), dtype=bool)
    first[1:] = (user[order][1:] != user[order][:-1]) | (item[order][1:] != item[order][:-1])
    return np.sort(order[first])


def _popularity_tiers(
    item_train: np.ndarray, item_ids: np.ndarray, shares: tuple[float, float]
) -> np.ndarray:
    """0 = head, 1 = torso, 2 = tail by cumulative share of train interactions."""
    order = np.lexsort((item_ids, -item_train))
    covered_before = np.cumsum(item_train[order]) - item_train[order]
    share_before = covered_before / max(item_train.sum(), 1)
    tier = np.empty(len(item_ids), dtype=np.int64)
    tier[order] = np.searchsorted(np.asarray(shares), share_before, side="right")
    tier[item_train == 0] = 2
    return tier


def _replace_columns(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    for name, values in columns.items():
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(name, values)
    return table
