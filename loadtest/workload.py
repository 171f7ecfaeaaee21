"""The requests the load test sends to ``POST /rank``, and the checks their answers must pass.

Users and candidates are sampled from the artifact's ``vocabularies.json`` (plain JSON), so
the load generator needs neither torch nor the model code. The traffic mixes known users,
cold-start users (IDs outside the vocabulary) and sessions carrying ``recent_items``; most
requests ask for the top ``TOP_K``, the rest for the whole candidate list.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import orjson

from recdistill.layout import ArtifactLayout

COLD_START_SHARE = 0.2
SESSION_SHARE = 0.3
FULL_RANKING_SHARE = 0.2
TOP_K = 10
MAX_RECENT_ITEMS = 5
# Cold-start IDs are drawn from this many IDs above the largest known one.
COLD_START_ID_RANGE = 1_000_000


@dataclass(frozen=True)
class RankCall:
    """One ``/rank`` request: ``kind`` names its traffic class in Locust's statistics."""

    kind: str
    body: dict[str, Any]

    @property
    def expected_length(self) -> int:
        k = self.body.get("k")
        candidates = len(self.body["candidates"])
        return candidates if k is None else min(k, candidates)


@dataclass(frozen=True)
class Workload:
    users: list[int]
    items: list[int]
    candidates: int
    first_unknown_user: int

    @classmethod
    def from_artifact(cls, artifact: Path, candidates: int) -> Workload:
        path = ArtifactLayout(Path(artifact)).vocabularies
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {artifact} an exported artifact?")
        vocabularies = orjson.loads(path.read_bytes())
        users, items = vocabularies["user_id"], vocabularies["item_id"]
        if not 1 <= candidates <= len(items):
            raise ValueError(
                f"{candidates} candidates asked for; {artifact} has {len(items)} items"
            )
        return cls(
            users=users, items=items, candidates=candidates, first_unknown_user=max(users) + 1
        )

    def sample(self, rng: random.Random) -> RankCall:
        cold_start = rng.random() < COLD_START_SHARE
        if cold_start:
            user = self.first_unknown_user + rng.randrange(COLD_START_ID_RANGE)
        else:
            user = rng.choice(self.users)
        body: dict[str, Any] = {
            "user_id": user,
            "candidates": rng.sample(self.items, self.candidates),
        }
        if rng.random() >= FULL_RANKING_SHARE:
            body["k"] = TOP_K
        kind = "cold-start" if cold_start else "known"
        if rng.random() < SESSION_SHARE:
            body["recent_items"] = rng.sample(self.items, rng.randint(1, MAX_RECENT_ITEMS))
            kind += "+session"
        return RankCall(kind=kind, body=body)


def check_ranking(response: Any, call: RankCall) -> str | None:
    """What is wrong with the decoded ``/rank`` response to ``call``; None if nothing."""
    items = response.get("items") if isinstance(response, dict) else None
    if not isinstance(items, list):
        return "the response has no list of items"
    if len(items) != call.expected_length:
        return f"{len(items)} items returned, expected {call.expected_length}"
    try:
        ids = [item["item_id"] for item in items]
        scores = [float(item["score"]) for item in items]
    except (KeyError, TypeError, ValueError):
        return "an item lacks an item_id or a numeric score"
    if len(set(ids)) != len(ids) or not set(ids) <= set(call.body["candidates"]):
        return "the items are not distinct candidates of the request"
    if any(higher < lower for higher, lower in pairwise(scores)):
        return "the items are not sorted by score, descending"
    return None
