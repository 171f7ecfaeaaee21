"""The canonical tables every data source is turned into, and how they are written.

A data directory (its files are named in :class:`~recdistill.layout.DataLayout`) holds:

- ``interactions``: ``user_id``, ``item_id``, ``timestamp`` (seconds), ``rating``
- ``users``: ``user_id`` + categorical feature columns + segment columns
- ``items``: ``item_id``, ``title``, ``genres`` (list of strings) + popularity columns
- the ``train``, ``valid`` and ``test`` splits: the leave-one-out split of ``interactions``
- ``candidates`` of ``valid`` and ``test``: per user the held-out item plus sampled negatives
- ``meta``: source, sizes, feature and segment column names, split settings
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recdistill.files import write_json
from recdistill.layout import DataLayout

INTERACTIONS_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("timestamp", pa.int64()),
        ("rating", pa.float32()),
    ]
)

SPLITS = ("train", "valid", "test")
# The users and items tables of data imported with string IDs keep the user's own ID here,
# beside the integer code that ``user_id`` / ``item_id`` hold.
EXTERNAL_ID = "external_id"


@dataclass(frozen=True)
class RawDataset:
    """A source's tables before splitting: what a reader hands to :func:`write_raw`.

    ``users`` holds ``user_id`` and the string-valued ``user_features`` columns;
    ``items`` holds ``item_id``, ``title`` and ``genres`` (list of strings).
    """

    source: str
    interactions: pa.Table
    users: pa.Table
    items: pa.Table
    user_features: tuple[str, ...]


def write_raw(directory: Path, raw: RawDataset) -> None:
    layout = DataLayout(directory)
    pq.write_table(raw.interactions.cast(INTERACTIONS_SCHEMA), layout.interactions)
    pq.write_table(raw.users, layout.users)
    pq.write_table(raw.items, layout.items)
    write_json(
        layout.meta,
        {"source": raw.source, "user_features": list(raw.user_features)},
    )


def rows_of_ids(ids: np.ndarray, wanted: np.ndarray, where: str) -> np.ndarray:
    """Positions of ``wanted`` IDs in the sorted, unique ``ids``; each one must be present.

    ``where`` names the ID set in the error, e.g. ``"the oracle's users"``.
    """
    wanted = np.asarray(wanted, dtype=np.int64)
    rows = np.minimum(np.searchsorted(ids, wanted), len(ids) - 1)
    missing = ids[rows] != wanted
    if missing.any():
        raise KeyError(f"{where} has no id {wanted[missing].flat[0]}")
    return rows


def read_meta(directory: Path) -> dict[str, Any]:
    path = DataLayout(Path(directory)).meta
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a recdistill data directory "
            "(create one with `recdistill data synthetic` or `recdistill data movielens`)"
        )
    return json.loads(path.read_text())
