"""A teacher's own vocabulary: the index it knows each of the user's IDs by.

A declared vocabulary is a Parquet table of one column, row ``k`` the ID of index ``k`` (a
null row is an index no ID has, such as padding). Without one, integer IDs are their own
index, and string IDs cannot be sent to a tensor graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recdistill.errors import TeacherError


class IndexMap:
    """The user's own IDs of one kind (items, users, a feature's values) to a teacher's
    indices: through a declared table, or integers as themselves (``ids`` None)."""

    def __init__(self, ids: pa.Array | None, source: str) -> None:
        self.source = source
        self.declared = ids is not None
        if ids is None:
            return
        real = ids.is_valid().to_numpy(zero_copy_only=False)
        indices = np.flatnonzero(real)
        values = _comparable(ids.filter(ids.is_valid()).to_numpy(zero_copy_only=False))
        order = np.argsort(values, kind="stable")
        self.sorted_ids, self.sorted_indices = values[order], indices[order]
        repeated = self.sorted_ids[1:][self.sorted_ids[1:] == self.sorted_ids[:-1]]
        if len(repeated):
            raise TeacherError(
                f"{source}: IDs repeat ({len(repeated)} of them, e.g. {few(repeated)}): "
                "each ID must have one index"
            )

    @classmethod
    def read(cls, path: Path | str | None, source: str) -> IndexMap:
        """The table at ``path`` (None: integers as themselves)."""
        if path is None:
            return cls(None, source)
        path = Path(path)
        if not path.is_file():
            raise TeacherError(f"{source}: vocabulary {path} not found")
        table = pq.read_table(path)
        if table.num_columns != 1:
            raise TeacherError(
                f"{source}: vocabulary {path} must hold one column (row k: the ID of index k), "
                f"not {table.column_names}"
            )
        return cls(table.column(0).combine_chunks(), f"{source} ({path.name})")

    def indices(self, ids: np.ndarray) -> np.ndarray:
        """The index of each of ``ids``; -1 where the vocabulary does not know it."""
        ids = np.asarray(ids)
        if not self.declared:
            if ids.dtype.kind not in "iu":
                raise TeacherError(
                    f"{self.source}: the IDs are strings and the teacher declares no vocabulary "
                    "table for them; a tensor graph reads integers"
                )
            return ids.astype(np.int64)
        if len(self.sorted_ids) == 0:
            return np.full(ids.shape, -1, dtype=np.int64)
        wanted = _comparable(ids.ravel())
        if wanted.dtype.kind != self.sorted_ids.dtype.kind and not (
            wanted.dtype.kind in "iu" and self.sorted_ids.dtype.kind in "iu"
        ):
            raise TeacherError(
                f"{self.source}: the vocabulary holds {_kind(self.sorted_ids)}, "
                f"the data's IDs are {_kind(wanted)}"
            )
        position = np.minimum(np.searchsorted(self.sorted_ids, wanted), len(self.sorted_ids) - 1)
        known = self.sorted_ids[position] == wanted
        return np.where(known, self.sorted_indices[position], -1).reshape(ids.shape)

    def require(self, ids: np.ndarray, what: str) -> np.ndarray:
        """The indices of ``ids`` (``what`` names them, e.g. "the data's items"); an ID the
        vocabulary does not know is a :class:`TeacherError` saying how many and which."""
        indices = self.indices(ids)
        unknown = np.asarray(ids)[indices < 0]
        if len(unknown):
            raise TeacherError(
                f"{self.source} does not know {len(unknown):,} of {what} "
                f"({len(np.asarray(ids)):,}), e.g. {few(unknown)}"
            )
        return indices


def _comparable(ids: np.ndarray) -> np.ndarray:
    """Integers as int64, anything else as strings (object), so that searches compare alike."""
    if ids.dtype.kind in "iu":
        return ids.astype(np.int64)
    return np.array([str(value) for value in ids.tolist()], dtype=object)


def _kind(ids: np.ndarray) -> str:
    return "integers" if ids.dtype.kind in "iu" else "strings"


def few(values: np.ndarray, count: int = 5) -> str:
    return ", ".join(str(value) for value in np.asarray(values).ravel()[:count].tolist())
