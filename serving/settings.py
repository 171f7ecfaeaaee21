"""The settings of a ranking server: kept free of torch, so the CLI reads its defaults fast."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from recdistill.layout import IMPRESSIONS


@dataclass(frozen=True)
class ServerSettings:
    artifacts: tuple[str, ...]
    ab_config: str | None = None
    impressions: str = IMPRESSIONS
    max_candidates: int = 1000
    max_body_bytes: int = 64 * 1024
    threads: int = 1
    precompute_items: bool = False
    artifact_root: str | None = None

    def reload_root(self) -> Path:
        """The directory reloads may load from: ``artifact_root``, or by default the
        common parent directory of the served artifacts (symlinks and ``..`` resolved)."""
        if self.artifact_root is not None:
            return Path(self.artifact_root).resolve()
        return Path(os.path.commonpath([Path(a).resolve().parent for a in self.artifacts]))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServerSettings:
        values = json.loads(text)
        return cls(**{**values, "artifacts": tuple(values["artifacts"])})
