"""Vectorised sampling of items a user has never interacted with."""

from __future__ import annotations

import numpy as np

# Users are sampled for in blocks of about this many draws, to bound memory.
BLOCK_DRAWS = 2_000_000


def pair_keys(users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    """Encode (user index, item index) pairs as one int64 each, for sorted look-ups."""
    return users.astype(np.int64) * n_items + items.astype(np.int64)


def sample_unseen(
    users: np.ndarray,
    count: int,
    seen_keys: np.ndarray,
    n_items: int,
    rng: np.random.Generator,
    *,
    first_item: int = 0,
) -> np.ndarray:
    """For each entry of ``users``, ``count`` distinct items that user has never seen.

    ``seen_keys`` is the sorted array of :func:`pair_keys` of every (user, item) to avoid;
    items are drawn uniformly from ``[first_item, n_items)``. Returns ``[len(users), count]``
    int64.
    """
    users = np.asarray(users, dtype=np.int64)
    block = max(1, BLOCK_DRAWS // (2 * count + 8))
    parts = [
        _sample_block(users[start : start + block], count, seen_keys, n_items, rng, first_item)
        for start in range(0, len(users), block)
    ]
    return np.concatenate(parts) if parts else np.empty((0, count), dtype=np.int64)


def _sample_block(
    users: np.ndarray,
    count: int,
    seen_keys: np.ndarray,
    n_items: int,
    rng: np.random.Generator,
    first_item: int,
) -> np.ndarray:
    """Draw candidates per row, drop seen ones and repeats within the row (keeping the first
    draw, so the kept set stays uniform), and redraw rows that came up short with more draws.
    """
    result = np.empty((len(users), count), dtype=np.int64)
    pending = np.arange(len(users))
    draws = 2 * count + 8
    available = n_items - first_item
    while len(pending):
        if draws > 64 * available:
            worst = users[pending[0]]
            raise ValueError(
                f"user index {worst} has seen too many of the {available} items to sample "
                f"{count} unseen ones"
            )
        rows = users[pending]
        drawn = rng.integers(first_item, n_items, size=(len(rows), draws))
        keys = pair_keys(rows[:, None], drawn, n_items)
        position = np.searchsorted(seen_keys, keys)
        position = np.minimum(position, max(len(seen_keys) - 1, 0))
        valid = seen_keys[position] != keys if len(seen_keys) else np.ones_like(keys, bool)
        valid &= ~_repeats_within_row(drawn)
        kept = np.cumsum(valid, axis=1)
        complete = kept[:, -1] >= count
        take = valid & (kept <= count)
        result[pending[complete]] = drawn[complete][take[complete]].reshape(-1, count)
        pending = pending[~complete]
        draws *= 2
    return result


def _repeats_within_row(values: np.ndarray) -> np.ndarray:
    """True where a value already occurred earlier in its row."""
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=1)
    repeat_sorted = np.zeros_like(values, dtype=bool)
    repeat_sorted[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    repeat = np.empty_like(repeat_sorted)
    np.put_along_axis(repeat, order, repeat_sorted, axis=1)
    return repeat
