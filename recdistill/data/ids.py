"""The integer IDs of users and items, and the user's own string IDs they stand for.

Data imported with string IDs (``recdistill data import``) gives each distinct ID an integer
code; the users and items tables keep the string in ``external_id``. Every place a person
reads or sends an ID (the Python ranker, the HTTP API) goes through :class:`IdCodes`.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from recdistill.data.tables import EXTERNAL_ID

# An integer ID written as text: no sign but "-", no leading zeros, and it fits in int64.
INTEGER_ID = re.compile(r"-?(0|[1-9][0-9]{0,17})")


@dataclass(frozen=True)
class IdCodes:
    """The integer IDs of a set of users or items: the IDs themselves when they are integers,
    else codes 1, 2, ... for the sorted strings in ``names``."""

    codes: np.ndarray  # sorted, int64
    names: np.ndarray | None  # the user's own string IDs, aligned with ``codes``

    @classmethod
    def of(cls, ids: np.ndarray) -> IdCodes:
        if ids.dtype.kind == "i":
            return cls(np.unique(ids), None)
        names = np.unique(ids)
        return cls(np.arange(1, len(names) + 1, dtype=np.int64), names)

    def encode(self, ids: np.ndarray) -> np.ndarray:
        """The codes of ``ids``; -1 for an ID outside the set."""
        if self.names is None:
            known, valid = self.codes, np.ones(len(ids), dtype=bool)
            if ids.dtype.kind != "i":
                texts = ids.astype(str)
                valid = np.array([bool(INTEGER_ID.fullmatch(t)) for t in texts], dtype=bool)
                ids = np.where(valid, texts, "0").astype(np.int64)
        else:
            known, valid = self.names, np.ones(len(ids), dtype=bool)
            ids = ids.astype(str).astype(object)
        position = np.minimum(np.searchsorted(known, ids), len(known) - 1)
        return np.where(valid & (known[position] == ids), self.codes[position], -1)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Codes of IDs a person sent: integer IDs of an integer set pass through as they are
        (a vocabulary maps unknown ones to its unknown row), the rest are encoded."""
        if self.names is None and ids.dtype.kind == "i":
            return ids
        return self.encode(ids)

    def named(self, codes: np.ndarray) -> list:
        """The user's own IDs of ``codes`` (each a member of the set)."""
        if self.names is None:
            return codes.tolist()
        return self.names[np.searchsorted(self.codes, codes)].tolist()

    @classmethod
    def of_table(cls, table: pa.Table, column: str) -> IdCodes:
        """The IDs of a users or items table, with their ``external_id`` column if any."""
        names = None
        if EXTERNAL_ID in table.column_names:
            names = table.column(EXTERNAL_ID).to_numpy(zero_copy_only=False).astype(object)
        codes = table.column(column).to_numpy()
        order = np.argsort(codes)
        return cls(codes[order], None if names is None else names[order])

    def table(self, name: str) -> dict[str, pa.Array]:
        """The ID column ``name`` and, for string IDs, their ``external_id`` column."""
        columns = {name: pa.array(self.codes, pa.int64())}
        if self.names is not None:
            columns[EXTERNAL_ID] = pa.array(self.names.tolist(), pa.string())
        return columns


def require_id_kind(ids: Iterable[Any], codes: IdCodes, what: str, model: str) -> None:
    """A ``ValueError`` unless every one of ``ids`` is a string where ``codes`` holds string
    IDs and an integer where it holds integer ones (a bool is neither): an ID of the wrong
    kind would be read as unknown, not refused."""
    textual = codes.names is not None
    for value in ids:
        integer = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if not (isinstance(value, str) if textual else integer):
            kind = "strings" if textual else "integers"
            raise ValueError(f"{what}: the model {model!r} has {kind} as IDs")
