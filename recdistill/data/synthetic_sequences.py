"""Every synthetic user's sequence of interactions: a pool of items, then a walk through it.

The process is described in :mod:`recdistill.data.synthetic`; here it is vectorised over
chunks of users and streamed to Parquet.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from recdistill.data.synthetic_truth import GroundTruth
from recdistill.data.synthetic_world import SyntheticSpec
from recdistill.data.tables import INTERACTIONS_SCHEMA

# Users are simulated in chunks of about this many cells: their relevance logits over all
# items, and the b_i vectors of their pools.
CHUNK_CELLS = 16_000_000
# Interactions are buffered up to this many rows per Parquet row group.
ROW_GROUP_ROWS = 1_000_000
# Floor of the uniforms turned into Gumbel noise, so that none is infinite.
TINY = np.finfo(np.float32).tiny


def write_interactions(
    spec: SyntheticSpec, truth: GroundTruth, activity: np.ndarray, path: Path
) -> tuple[int, np.ndarray]:
    """Simulate every user's sequence chunk by chunk and stream it to Parquet.

    Returns the number of interactions and each user's sequence state after them.
    """
    pool_cells = spec.pool_factor * spec.mean_activity * spec.sequence_dim
    chunk_users = max(1, int(CHUNK_CELLS // (spec.items + pool_cells)))
    final_state = np.zeros((spec.users, spec.sequence_dim), dtype=np.float32)
    written = 0
    buffered: list[pa.Table] = []
    with pq.ParquetWriter(path, INTERACTIONS_SCHEMA) as writer:
        starts = range(0, spec.users, chunk_users)
        for chunk, start in enumerate(
            tqdm(starts, desc="synthetic users", unit="chunk", disable=None)
        ):
            rng = np.random.default_rng([spec.seed, chunk])
            users = np.arange(start, min(start + chunk_users, spec.users))
            table = _simulate(spec, truth, users, activity[users], rng, final_state)
            buffered.append(table)
            written += len(table)
            if sum(len(t) for t in buffered) >= ROW_GROUP_ROWS:
                writer.write_table(pa.concat_tables(buffered))
                buffered = []
        if buffered:
            writer.write_table(pa.concat_tables(buffered))
    return written, final_state


def _simulate(
    spec: SyntheticSpec,
    truth: GroundTruth,
    users: np.ndarray,
    activity: np.ndarray,
    rng: np.random.Generator,
    final_state: np.ndarray,
) -> pa.Table:
    """The interactions of ``users`` (rows), sorted by user and time; writes their final
    sequence states into ``final_state``."""
    logits = _history_free(truth, users)
    noisy = logits - np.log(-np.log(np.maximum(rng.random(logits.shape, dtype=np.float32), TINY)))
    pool_sizes = np.minimum(spec.items, np.ceil(spec.pool_factor * activity)).astype(np.int64)
    user_rows, item_rows, timestamps = [], [], []
    for group in _activity_groups(activity):
        pool = _pools(noisy[group], pool_sizes[group])
        pool_logits = logits[group[:, None], pool]
        pool_logits[np.arange(pool.shape[1]) >= pool_sizes[group, None]] = -np.inf
        picks, final_state[users[group]] = _walk(truth, pool, pool_logits, activity[group], rng)
        taken = np.arange(picks.shape[1]) < activity[group, None]
        user_rows.append(np.repeat(users[group], activity[group]))
        item_rows.append(np.take_along_axis(pool, picks, axis=1)[taken])
        timestamps.append(_timestamps(spec, activity[group], rng)[taken])
    user_rows, item_rows, timestamps = map(np.concatenate, (user_rows, item_rows, timestamps))
    # Each user's rows are in sequence order within their group; a stable sort keeps it.
    order = np.argsort(user_rows, kind="stable")
    return pa.table(
        {
            "user_id": truth.user_ids[user_rows[order]],
            "item_id": truth.item_ids[item_rows[order]],
            "timestamp": timestamps[order],
            "rating": np.ones(len(order), dtype=np.float32),
        },
        schema=INTERACTIONS_SCHEMA,
    )


def _history_free(truth: GroundTruth, users: np.ndarray) -> np.ndarray:
    """``[users, items]`` relevance without the sequence term, user and item rows."""
    logits = truth.user_factors[users] @ truth.item_factors.T
    logits += truth.user_popularity_weight[users, None] * truth.item_log_popularity
    regional = truth.region_genre[truth.user_region[users]]
    logits += truth.feature_interaction * (regional @ truth.item_genre_weights.T)
    return logits


def _activity_groups(activity: np.ndarray) -> list[np.ndarray]:
    """Positions of users by decreasing activity, split where the activity halves: padding a
    group's pools and steps to its most active user at most doubles the work."""
    order = np.argsort(-activity, kind="stable")
    octave = np.floor(np.log2(activity[order]))
    return np.split(order, np.flatnonzero(np.diff(octave)) + 1)


def _pools(noisy: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Item rows of each user's ``sizes.max()`` best noisy logits, best first: the first
    ``size`` of a row are the user's pool (Gumbel top-k)."""
    width = int(sizes.max())
    best = np.argpartition(-noisy, width - 1, axis=1)[:, :width]
    return np.take_along_axis(
        best, np.argsort(-np.take_along_axis(noisy, best, axis=1), axis=1), axis=1
    )


def _walk(
    truth: GroundTruth,
    pool: np.ndarray,
    pool_logits: np.ndarray,
    activity: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Each user's sequence through their pool: ``[users, activity.max()]`` pool positions in
    order (past a user's activity meaningless) and the state after the sequence.

    Users come by decreasing activity, so the ones still walking are a prefix; a pool item's
    logit becomes -inf once taken.
    """
    follows = truth.item_follows[pool]
    state = np.zeros((len(pool), follows.shape[2]), dtype=np.float32)
    picks = np.zeros((len(pool), int(activity[0])), dtype=np.int64)
    for step in range(picks.shape[1]):
        active = int(np.searchsorted(-activity, -step))
        rows = np.arange(active)
        sequence = np.matmul(follows[:active], state[:active, :, None])[..., 0]
        scores = pool_logits[:active] + truth.sequence_weight * sequence
        scores -= np.log(-np.log(np.maximum(rng.random(scores.shape, dtype=np.float32), TINY)))
        pick = scores.argmax(axis=1)
        picks[:active, step] = pick
        pool_logits[rows, pick] = -np.inf
        state[:active] *= truth.sequence_decay
        state[:active] += truth.item_leads_to[pool[rows, pick]]
    return picks, state


def _timestamps(spec: SyntheticSpec, activity: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``[users, activity.max()]`` times, strictly increasing along each user's sequence and
    spread over the user's active period (past a user's activity meaningless)."""
    span = spec.days * 86_400
    steps = np.arange(activity.max())
    offsets = np.sort(
        np.where(steps < activity[:, None], rng.random((len(activity), len(steps))), 2.0), axis=1
    )
    first_seen = rng.uniform(0.0, 0.7 * span, size=(len(activity), 1))
    seconds = (first_seen + 0.3 * span * offsets).astype(np.int64)
    # Whole seconds may tie: each one is moved to at least one second after the previous.
    return spec.start_time + np.maximum.accumulate(seconds - steps, axis=1) + steps
