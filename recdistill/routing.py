"""A/B traffic assignment: deterministic hash buckets, shared by the server and the simulator.

A user's bucket is ``sha256(f"{salt}:{user_id}") mod 10000`` (the digest read as one
big-endian integer); arms own consecutive bucket ranges in config order, each as wide as its
share. The same user therefore always lands in the same arm for a given salt, and a new salt
reshuffles everyone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recdistill.config import load_config, section
from recdistill.server import ServerSettings

BUCKETS = 10_000


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

    def __post_init__(self) -> None:
        if not self.arms:
            raise ValueError("an A/B config needs at least one arm")
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

    @classmethod
    def from_config(cls, table: dict[str, Any], where: str = "[ab]") -> Routing:
        """From ``{"salt": ..., "arms": {name: {"model": ..., "share": ...}}}`` (TOML ``[ab]``)."""
        unknown = sorted(set(table) - {"salt", "arms"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are ['arms', 'salt']")
        if "salt" not in table or not isinstance(table["salt"], str):
            raise ValueError(f"{where}: give a string salt")
        arms = []
        for name, arm in table.get("arms", {}).items():
            missing = {"model", "share"} - set(arm)
            if missing or set(arm) - {"model", "share"}:
                raise ValueError(f"{where}.arms.{name}: give exactly `model` and `share`")
            arms.append(Arm(name, str(arm["model"]), float(arm["share"])))
        return cls(salt=table["salt"], arms=tuple(arms))

    @property
    def bounds(self) -> np.ndarray:
        """The first bucket past each arm's range."""
        return np.round(np.cumsum([arm.share for arm in self.arms]) * BUCKETS).astype(np.int64)

    def arm_of(self, user_id: int) -> Arm:
        index = int(np.searchsorted(self.bounds, bucket(self.salt, user_id), side="right"))
        return self.arms[index]

    def arms_of(self, user_ids: np.ndarray) -> np.ndarray:
        """Arm index per user id (vectorised over many users, for simulations)."""
        buckets = np.array([bucket(self.salt, int(u)) for u in user_ids], dtype=np.int64)
        return np.searchsorted(self.bounds, buckets, side="right")


def bucket(salt: str, user_id: int) -> int:
    digest = hashlib.sha256(f"{salt}:{user_id}".encode()).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def routing_for(settings: ServerSettings, models: set[str]) -> Routing:
    """The A/B routing of ``settings`` over the served ``models``, checked against them."""
    if settings.ab_config is None:
        if len(models) > 1:
            raise ValueError("several artifacts need an A/B config (--ab) to route between them")
        return Routing.single(next(iter(models)))
    routing = Routing.from_config(section(load_config(Path(settings.ab_config)), "ab"))
    unknown = sorted({arm.model for arm in routing.arms} - models)
    if unknown:
        raise ValueError(f"A/B arms use {unknown}, which no --artifact provides ({sorted(models)})")
    return routing
