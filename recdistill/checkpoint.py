"""A stage's checkpoint: what it holds, and the checks that decide whether it may be resumed.

Tensors are whole and keyed by name, so that any world size can resume from it: ``optimizer``
holds Adam's state per parameter name; ``embedding_optimizer`` the fused kernel's state of
sharded tables (empty in a single process, where Adam updates the tables too).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from recdistill.files import atomic_write
from recdistill.stage import StageSpec

# Checkpoints of other formats (or none) are refused rather than resumed differently.
CHECKPOINT_FORMAT = 3
# The stage spec's fields a resume may change: a diverged stage continues from its last good
# checkpoint at a lower rate. Any other change makes the checkpoint another stage's.
RESUMABLE_CHANGES = ("learning_rate", "adagrad_learning_rate")


def save_checkpoint(
    path: Path,
    spec: StageSpec,
    *,
    model: dict[str, torch.Tensor],
    adapters: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    embedding_optimizer: dict[str, torch.Tensor],
    state: dict[str, Any],
) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": model,
        "adapters": adapters,
        "optimizer": optimizer,
        "embedding_optimizer": embedding_optimizer,
        "state": state,
        "spec": json.dumps(dataclasses.asdict(spec)),
    }
    atomic_write(path, lambda scratch: torch.save(payload, scratch))


def load_checkpoint(path: Path, spec: StageSpec, *, announce: bool) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if there is one, refused if another version of recdistill
    or another stage spec wrote it; ``announce`` says which resumable changes it resumes with."""
    if not path.exists():
        return None
    payload = torch.load(path, weights_only=True, map_location="cpu")
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} was written by another version of recdistill; start a fresh run directory"
        )
    # A field added since the checkpoint was written reads as its default.
    defaults = {
        f.name: f.default
        for f in dataclasses.fields(StageSpec)
        if f.default is not dataclasses.MISSING
    }
    saved, current = defaults | json.loads(payload["spec"]), dataclasses.asdict(spec)
    if _fixed_on_resume(saved) != _fixed_on_resume(current):
        raise ValueError(
            f"{path} was written for a different stage spec (a resume may change only "
            f"{', '.join(RESUMABLE_CHANGES)}); start a fresh run directory"
        )
    changed = [key for key in RESUMABLE_CHANGES if saved[key] != current[key]]
    if changed and announce:
        tqdm.write(
            f"{spec.name}: resuming after epoch {payload['state']['epoch']} with "
            + ", ".join(f"{key} {current[key]} (was {saved[key]})" for key in changed),
            file=sys.stderr,
        )
    return payload


def trim_log(log: Path, epoch: int) -> None:
    """Drop the records after ``epoch``: a run killed after logging an epoch but before
    checkpointing it logs it again."""
    records = [json.loads(line) for line in log.read_text().splitlines()]
    kept = [r for r in records if r["epoch"] <= epoch]
    log.write_text("".join(json.dumps(r) + "\n" for r in kept))


def _fixed_on_resume(spec: dict[str, Any]) -> str:
    """The spec's fields a resume must keep, as JSON (tuples and lists compare equal)."""
    return json.dumps({k: v for k, v in spec.items() if k not in RESUMABLE_CHANGES}, sort_keys=True)
