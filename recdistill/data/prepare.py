"""Leave-one-out splits, candidate lists and segments, shared by every data source."""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from recdistill.data.sampling import pair_keys, sample_unseen
from recdistill.data.tables import INTERACTIONS_SCHEMA, SPLITS, read_meta, rows_of_ids
from recdistill.files import write_json
from recdistill.layout import DataLayout

ACTIVITY_TIERS = ("cold", "light", "medium", "heavy")
POPULARITY_TIERS = ("head", "torso", "tail")
# A user needs one train, one validation and one test interaction to be evaluated.
MIN_INTERACTIONS = 3
# Interactions are sorted and split in memory this many rows at a time (~100 bytes a row).
PARTITION_ROWS = 4_000_000
# Record batches read while scattering interactions to partitions.
SCAN_ROWS = 1 << 20
# Row groups of the split files, which readers stream a group at a time.
ROW_GROUP_ROWS = 1 << 16


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
    """Split ``directory``'s interactions and add candidates and segments; returns the meta.

    Out of core: interactions are scattered by user into partitions of about
    ``PARTITION_ROWS`` rows, contiguous user ranges so that the outputs stay sorted by user,
    and each partition is sorted, de-duplicated and split in memory on its own. Across
    partitions only per-user and per-item counts, the held-out rows and the sorted
    (user, item) keys that candidate sampling avoids (8 bytes per interaction) are kept.
    """
    layout = DataLayout(Path(directory))
    meta = read_meta(layout.root)
    users = pq.read_table(layout.users)
    items = pq.read_table(layout.items)
    user_ids = users.column("user_id").to_numpy()
    item_ids = items.column("item_id").to_numpy()

    splits = _write_splits(layout, user_ids, item_ids, spec.seed)
    if not splits.evaluated.any():
        raise ValueError(
            f"no user has the {MIN_INTERACTIONS} distinct items an evaluation needs "
            "(train, validation and test)"
        )
    if splits.user_counts.max() + spec.negatives > len(item_ids):
        raise ValueError(
            f"a user has chosen {splits.user_counts.max()} of the {len(item_ids)} items, too "
            f"few left to sample {spec.negatives} unseen candidates per list: lower negatives "
            "in [data.split]"
        )
    _write_candidates(layout, splits, user_ids, item_ids, spec)
    activity_thresholds = _write_segments(layout, users, items, splits, spec)

    meta.update(
        {
            "n_users": len(user_ids),
            "n_items": len(item_ids),
            "n_interactions": splits.interactions,
            "duplicate_pairs_dropped": splits.duplicates,
            "users_evaluated": int(splits.evaluated.sum()),
            "splits": splits.sizes,
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
    write_json(layout.meta, meta)
    return meta


@dataclass
class _Splits:
    """What writing the splits keeps for the candidate lists, the segments and the meta."""

    interactions: int  # rows read, duplicates included
    duplicates: int  # rows dropped for repeating an earlier (user, item) pair
    sizes: dict[str, int]  # rows per split
    user_counts: np.ndarray  # each user's interactions after de-duplication
    user_train: np.ndarray  # each user's train interactions
    item_train: np.ndarray  # each item's train interactions
    held_out: dict[str, tuple[np.ndarray, np.ndarray]]  # (user rows, item rows) per split
    seen: np.ndarray  # the sorted pair_keys of every (user, item) interaction

    @property
    def evaluated(self) -> np.ndarray:
        """Which users have a train, a validation and a test interaction."""
        return self.user_counts >= MIN_INTERACTIONS


def _write_splits(
    layout: DataLayout, user_ids: np.ndarray, item_ids: np.ndarray, seed: int
) -> _Splits:
    """Write the train, validation and test files partition by partition, keeping counts, the
    held-out rows and the seen (user, item) keys."""
    n_total, duplicates = 0, 0
    sizes = dict.fromkeys(SPLITS, 0)
    counts = np.zeros(len(user_ids), dtype=np.int64)
    user_train = np.zeros(len(user_ids), dtype=np.int64)
    item_train = np.zeros(len(item_ids), dtype=np.int64)
    seen_parts: list[np.ndarray] = []
    held_out: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"valid": [], "test": []}
    with tempfile.TemporaryDirectory(dir=layout.root) as scratch, ExitStack() as files:
        writers = {
            name: files.enter_context(pq.ParquetWriter(layout.split(name), INTERACTIONS_SCHEMA))
            for name in SPLITS
        }
        for table in _user_partitions(layout, user_ids, Path(scratch)):
            part = _split_partition(table, user_ids, item_ids, seed, layout)
            n_total += len(table)
            duplicates += len(table) - len(part.user_row)
            counts += part.counts
            for split, name in enumerate(SPLITS):
                keep = part.split_of == split
                sizes[name] += int(keep.sum())
                writers[name].write_table(
                    pa.table({k: v[keep] for k, v in part.columns.items()}, INTERACTIONS_SCHEMA),
                    row_group_size=ROW_GROUP_ROWS,
                )
                if name in held_out:
                    held_out[name].append((part.user_row[keep], part.item_row[keep]))
            train = part.split_of == 0
            user_train += np.bincount(part.user_row[train], minlength=len(user_ids))
            item_train += np.bincount(part.item_row[train], minlength=len(item_ids))
            # Pairs are unique by now; partitions hold increasing user ranges, so the
            # concatenated keys stay sorted.
            seen_parts.append(np.sort(pair_keys(part.user_row, part.item_row, len(item_ids))))
            del table, part
    return _Splits(
        interactions=n_total,
        duplicates=duplicates,
        sizes=sizes,
        user_counts=counts,
        user_train=user_train,
        item_train=item_train,
        held_out={
            name: (np.concatenate([u for u, _ in rows]), np.concatenate([i for _, i in rows]))
            for name, rows in held_out.items()
        },
        seen=np.concatenate(seen_parts),
    )


def _write_candidates(
    layout: DataLayout,
    splits: _Splits,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    spec: SplitSpec,
) -> None:
    """Per held-out row, the held-out item and ``spec.negatives`` items the user never saw."""
    rng = np.random.default_rng(spec.seed)
    for name, (user_row, item_row) in splits.held_out.items():
        negatives = sample_unseen(user_row, spec.negatives, splits.seen, len(item_ids), rng)
        candidates = np.concatenate([item_row[:, None], negatives], axis=1)
        list_size = candidates.shape[1]
        pq.write_table(
            pa.table(
                {
                    "user_id": user_ids[user_row],
                    "item_id": item_ids[item_row],
                    "candidates": pa.ListArray.from_arrays(
                        np.arange(0, candidates.size + 1, list_size),
                        item_ids[candidates.ravel()],
                    ),
                }
            ),
            layout.candidates(name),
        )


def _write_segments(
    layout: DataLayout, users: pa.Table, items: pa.Table, splits: _Splits, spec: SplitSpec
) -> np.ndarray:
    """Add train counts and the activity and popularity tiers to the users and items tables;
    returns the activity tiers' thresholds."""
    activity_thresholds = np.quantile(splits.user_train[splits.evaluated], spec.activity_quantiles)
    activity = np.searchsorted(activity_thresholds, splits.user_train, side="left")
    popularity = _popularity_tiers(
        splits.item_train, items.column("item_id").to_numpy(), spec.popularity_shares
    )
    users = _replace_columns(
        users,
        {
            "n_train": pa.array(splits.user_train),
            "activity_tier": pa.array(np.asarray(ACTIVITY_TIERS)[activity]),
        },
    )
    items = _replace_columns(
        items,
        {
            "n_train": pa.array(splits.item_train),
            "popularity_tier": pa.array(np.asarray(POPULARITY_TIERS)[popularity]),
        },
    )
    pq.write_table(users, layout.users)
    pq.write_table(items, layout.items)
    return activity_thresholds


@dataclass
class _Partition:
    """One user range's interactions after de-duplication, sorted by user, time and item."""

    columns: dict[str, np.ndarray]
    user_row: np.ndarray
    item_row: np.ndarray
    split_of: np.ndarray
    counts: np.ndarray


def _user_partitions(layout: DataLayout, user_ids: np.ndarray, scratch: Path) -> Iterator[pa.Table]:
    """The interactions in contiguous ranges of users, each range whole and in file order.

    With more than ``PARTITION_ROWS`` rows, record batches are scattered to one Parquet file
    per range in ``scratch`` first; each file is read back, handed out and deleted in turn.
    """
    interactions = ds.dataset(layout.interactions, format="parquet")
    parts = max(1, math.ceil(interactions.count_rows() / PARTITION_ROWS))
    if parts == 1:
        yield interactions.to_table()
        return
    # The first user ID of partitions 1, 2, ...: ranges hold about as many users each.
    firsts = user_ids[np.linspace(0, len(user_ids), parts + 1).astype(np.int64)[1:-1]]
    paths = [scratch / f"partition-{p}.parquet" for p in range(parts)]
    with ExitStack() as files:
        writers = [
            files.enter_context(pq.ParquetWriter(path, interactions.schema)) for path in paths
        ]
        for record in interactions.to_batches(batch_size=SCAN_ROWS):
            part = np.searchsorted(firsts, record.column("user_id").to_numpy(), side="right")
            order = np.argsort(part, kind="stable")
            bounds = np.searchsorted(part[order], np.arange(parts + 1))
            ordered = pa.Table.from_batches([record]).take(order)
            for p, writer in enumerate(writers):
                if bounds[p + 1] > bounds[p]:
                    writer.write_table(ordered.slice(bounds[p], bounds[p + 1] - bounds[p]))
    for path in paths:
        yield pq.read_table(path)
        path.unlink()


def _split_partition(
    table: pa.Table, user_ids: np.ndarray, item_ids: np.ndarray, seed: int, layout: DataLayout
) -> _Partition:
    """Sort by user, time and a seeded random tie-break, keep each pair's latest row, and
    assign the splits (0 train, 1 validation, 2 test) by position from each user's end."""
    user = table.column("user_id").to_numpy()
    item = table.column("item_id").to_numpy()
    timestamp = table.column("timestamp").to_numpy()
    rating = table.column("rating").to_numpy()

    order = np.lexsort((tie_break_key(user, item, seed), timestamp, user))
    user, item, timestamp, rating = user[order], item[order], timestamp[order], rating[order]
    del order
    last_of_pair = _last_of_each_pair(user, item)
    user, item, timestamp, rating = (
        user[last_of_pair],
        item[last_of_pair],
        timestamp[last_of_pair],
        rating[last_of_pair],
    )

    user_row = rows_of_ids(user_ids, user, layout.users.name)
    item_row = rows_of_ids(item_ids, item, layout.items.name)
    counts = np.bincount(user_row, minlength=len(user_ids))
    from_end = np.cumsum(counts)[user_row] - 1 - np.arange(len(user))
    evaluated = counts[user_row] >= MIN_INTERACTIONS
    split_of = np.where(evaluated & (from_end == 0), 2, np.where(evaluated & (from_end == 1), 1, 0))
    return _Partition(
        columns={"user_id": user, "item_id": item, "timestamp": timestamp, "rating": rating},
        user_row=user_row,
        item_row=item_row,
        split_of=split_of,
        counts=counts,
    )


def tie_break_key(user: np.ndarray, item: np.ndarray, seed: int) -> np.ndarray:
    """A pseudo-random order of (user, item) pairs, fixed by ``seed``.

    Interactions in the same second have no order. Breaking such ties by item ID would make
    the held-out item "the highest ID of the last second" (on ml-100k, 44 % of users' last
    two ratings share a second), which a sequence model could learn instead of taste. The
    key is a hash of the external IDs, so it does not depend on how rows are partitioned.
    """
    with np.errstate(over="ignore"):
        key = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        for value in (user, item):
            key = _mix64(key ^ value.astype(np.uint64))
    return key


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: every input bit changes about half of the output bits."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


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
