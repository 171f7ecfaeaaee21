"""A seeded synthetic world with a known ground truth.

Every user ``u`` and item ``i`` has latent factors; the true relevance of ``i`` to ``u`` after
``u``'s history ``h`` (items, newest first) is

    relevance(u, i | h) = p_u · q_i + w_u · log_popularity_i
                          + feature_interaction · region_genre[region_u] · g_i
                          + sequence_weight · s_u(h) · b_i,
    s_u(h) = Σ_r sequence_decay^r · a_{h_r}

- ``q_i`` is built from the item's genre centroids plus noise; genre sizes follow a power law;
  ``p_u · q_i`` has rank ``dim`` (32 by default), more than a small student's embedding width;
- ``log_popularity_i`` is a centred Zipf log-weight: item popularity is power-law;
- ``p_u`` is built from one or two favourite genres plus noise; users of region ``east`` carry
  an extra taste shift towards two niche genres the rest of the population rarely favours;
- ``w_u`` is the user's popularity sensitivity: light users follow the crowd, heavy users
  seek the niche, cold-start users follow the crowd most;
- ``region_genre`` is a ``[regions, genres]`` N(0, 1) matrix and ``g_i`` the item's genre
  weights (1 for its primary genre, 0.5 for its secondary one): an interaction of a user
  feature with an item feature;
- ``a_i`` (what ``i`` leads to) and ``b_i`` (what ``i`` follows) are vectors in R^k,
  ``k = sequence_dim``, of coordinates with variance 1 / sqrt(k), so that ``a_j · b_i`` has
  unit variance; the sequence state ``s_u`` remembers the recent items, the newest most, and
  makes the next item depend on them;
- ``age_bucket`` has no effect at all: a placebo segment on which no model should differ.

A user's number of interactions comes from a log-normal activity distribution (plus a
cold-start group with 3 to 5 interactions). The user first gets a pool of
``min(items, pool_factor × activity)`` items drawn without replacement from the softmax of the
history-free part of the relevance (Gumbel top-k), then walks through it: each next item is
drawn from the softmax of the full relevance over the pool items not yet taken (Gumbel-max),
and the state moves on, ``s ← a_j + sequence_decay · s`` from ``s = 0``. Timestamps increase
along the sequence, spread over the user's active period.

The world is drawn in :mod:`~recdistill.data.synthetic_world`, the sequences walked in
:mod:`~recdistill.data.synthetic_sequences`. The truth is saved beside the data (its tensors
and a description, :class:`~recdistill.layout.DataLayout`) so that any (user, item) pair can
be scored later with :meth:`~recdistill.data.synthetic_truth.GroundTruth.load` and
:meth:`~recdistill.data.synthetic_truth.GroundTruth.relevance`, by default after the user's
whole generated sequence.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow.parquet as pq

from recdistill.data.synthetic_sequences import write_interactions
from recdistill.data.synthetic_world import (
    REGIONS,
    SHIFTED_REGION,
    SyntheticSpec,
    World,
    build_world,
)
from recdistill.files import write_json
from recdistill.layout import DataLayout

SOURCE = "synthetic"
USER_FEATURES = ("region", "age_bucket")


def generate(spec: SyntheticSpec, directory: Path) -> None:
    """Write interactions, users, items, meta and the ground truth of ``spec`` to ``directory``."""
    layout = DataLayout(directory)
    world = build_world(spec)
    n_interactions, final_state = write_interactions(
        spec, world.truth, world.activity, layout.interactions
    )
    truth = dataclasses.replace(world.truth, user_sequence_state=final_state)

    pq.write_table(world.users, layout.users)
    pq.write_table(world.items, layout.items)
    truth.save(directory)
    write_json(layout.truth_json, _truth_description(spec, world))
    write_json(
        layout.meta,
        {
            "source": SOURCE,
            "user_features": list(USER_FEATURES),
            "ground_truth_segments": ["cold_start"],
            "generated_interactions": n_interactions,
            "synthetic": dataclasses.asdict(spec),
        },
    )


def _truth_description(spec: SyntheticSpec, world: World) -> dict:
    return {
        "relevance": (
            "p_u . q_i + w_u * log_popularity_i"
            " + feature_interaction * region_genre[region_u] . g_i"
            " + sequence_weight * s_u . b_i"
        ),
        "sequence_state": (
            "s_u = sum_r sequence_decay^r * a_{h_r} over the user's history h, newest first"
            " (s <- a_j + sequence_decay * s after item j, from s = 0)"
        ),
        "tensors": {
            "user_factors": "p_u, rows aligned with user_ids",
            "item_factors": "q_i, rows aligned with item_ids",
            "user_popularity_weight": "w_u",
            "item_log_popularity": "log_popularity_i (centred Zipf log-weight)",
            "user_region": f"region_u, index into {list(REGIONS)}",
            "region_genre": "[regions, genres], N(0, 1)",
            "item_genre_weights": "g_i: 1 for the primary genre, 0.5 for the secondary one",
            "item_leads_to": "a_i, coordinates of variance 1 / sqrt(sequence_dim)",
            "item_follows": "b_i, like a_i: a_j . b_i has unit variance",
            "user_sequence_state": "s_u after the user's whole generated sequence",
            "feature_interaction": "scalar",
            "sequence_weight": "scalar",
            "sequence_decay": "scalar",
        },
        "interactions": (
            "per user, a pool of min(items, pool_factor * activity) items drawn without"
            " replacement from softmax(relevance without the sequence term), then the sequence:"
            " each next item drawn from softmax(relevance(u, . | history so far)) over the pool"
            " items not yet taken; timestamps strictly increase along the sequence"
        ),
        "genres": world.genre_names,
        "shifted_region": SHIFTED_REGION,
        "niche_genres": world.niche_genres,
        "placebo_segment": "age_bucket: drawn independently of everything, no effect at all",
        "spec": dataclasses.asdict(spec),
    }
