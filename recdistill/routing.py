"""A/B traffic assignment: deterministic hash buckets, shared by the server and the simulator.

A user's bucket is ``sha256(f"{salt}:{user_id}") mod 10000`` (the digest read as one
big-endian integer); arms own consecutive bucket ranges in config order, each as wide as its
share. The same user therefore always lands in the same arm for a given salt, and a new salt
reshuffles everyone.

With ``design = "interleaving"`` there is no assignment: every request shows one slate merged
from the rankings of both of the two arms (:mod:`recdistill.interleaving`).
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np

BUCKETS = 10_000
# How an experiment shows its arms: each user one arm, or every request both, interleaved.
AB, INTERLEAVING = "ab", "interleaving"
DESIGNS = (AB, INTERLEAVING)


@dataclass(frozen=True)
class Arm:
    """One arm of an experiment: the model it serves and its share of traffic."""

    name: str
    model: str
    share: float


@dataclass(frozen=True)
class Routing:
    salt: str
    arms: tuple[Arm, ...]
    design: str = AB

    def __post_init__(self) -> None:
        if not self.arms:
            raise ValueError("an A/B config needs at least one arm")
        if self.design not in DESIGNS:
            raise ValueError(f"design must be one of {list(DESIGNS)}, not {self.design!r}")
        if self.interleaved and len(self.arms) != 2:
            raise ValueError(f"interleaving merges two arms' rankings, not {len(self.arms)}")
        if any(arm.share <= 0 for arm in self.arms):
            raise ValueError("every arm's share must be positive")
        total = sum(arm.share for arm in self.arms)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"arm shares add up to {total:g}, not 1")
        if len({arm.name for arm in self.arms}) != len(self.arms):
            raise ValueError("arm names must be distinct")

    @classmethod
    def single(cls, model: str) -> Routing:
        """All traffic to one model, the arm named after it."""
        return cls(salt="", arms=(Arm(model, model, 1.0),))

    @property
    def interleaved(self) -> bool:
        return self.design == INTERLEAVING

    @cached_property
    def bounds(self) -> tuple[int, ...]:
        """The first bucket past each arm's range (computed once: every request reads it)."""
        ends = np.round(np.cumsum([arm.share for arm in self.arms]) * BUCKETS)
        return tuple(int(end) for end in ends)

    def arm_of(self, user_id: int | str) -> Arm:
        if len(self.arms) == 1:
            return self.arms[0]
        return self.arms[bisect.bisect_right(self.bounds, bucket(self.salt, user_id))]

    def arms_of(self, user_ids: np.ndarray) -> np.ndarray:
        """Arm index per user id (vectorised over many users, for simulations)."""
        buckets = np.array([bucket(self.salt, int(u)) for u in user_ids], dtype=np.int64)
        return np.searchsorted(np.asarray(self.bounds), buckets, side="right")


def bucket(salt: str, user_id: int | str) -> int:
    digest = hashlib.sha256(f"{salt}:{user_id}".encode()).digest()
    return int.from_bytes(digest, "big") % BUCKETS
