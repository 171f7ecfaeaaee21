"""A trained user tower answering one request at a time without torchrec's jagged tensors.

At batch size one, building ``KeyedJaggedTensor``s and running ``EmbeddingBagCollection``
over them costs several times the model's own arithmetic. :class:`PlainUserTower` reads the
same weight tensors (not copies: a row the server sets, such as the unknown user's mean, is
seen by both) by row selection and means, then runs the tower's own sequence encoder (over
the history's real items only: a single history needs no padding) and MLP. Row-wise int8
tables are read the way fbgemm's kernels read them, ``code * scale + offset`` per row, and
an int8 MLP is the tower's own dynamically quantized layers. It is built from a trained
:class:`~recdistill.models.Tower`, never trained itself; ``tests/test_inference.py`` checks it
against the torchrec path.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from recdistill.models import HISTORY, RECENT, Tower

# Given one row index, that row; given a tensor of them, those rows.
Rows = Callable[[int | torch.Tensor], torch.Tensor]


class PlainUserTower:
    """One user's vector from their index, history (item indices, newest first) and
    feature codes, as ``tower`` computes it from the user-side KJT. Call it in inference
    mode."""

    def __init__(self, tower: Tower) -> None:
        self.keys = tower.keys
        self.rows = [_row_reader(table) for table in tower.bag_tables()]
        self.recent_length = tower.recent_length
        self.sequence = tower.sequence
        if self.sequence is not None:
            (table,) = self.sequence.embeddings.embeddings.values()
            self.sequence_table = table.weight
        self.mlp = tower.mlp

    def __call__(self, user: int, history: torch.Tensor, codes: dict[str, int]) -> torch.Tensor:
        parts = []
        for key, rows in zip(self.keys, self.rows):
            if key == HISTORY:
                parts.append(_mean(rows, history))
            elif key == RECENT:
                parts.append(_mean(rows, history[: self.recent_length]))
            else:
                parts.append(rows(user if key == "user_id" else codes[key]))
        if self.sequence is not None:
            parts.append(self._sequence(history))
        return self.mlp(torch.cat(parts)[None])[0]

    def _sequence(self, history: torch.Tensor) -> torch.Tensor:
        read = history[: self.sequence.max_length]
        if len(read):
            embedded = torch.index_select(self.sequence_table, 0, read)[None]
        else:
            embedded = self.sequence_table.new_zeros(1, 1, self.sequence_table.shape[1])
        outputs, real = self.sequence.attend(embedded, torch.tensor([len(read)]))
        return self.sequence.read_out(outputs, real)[0]


def _row_reader(table: nn.Module) -> Rows:
    """Rows of an embedding-bag table as float: a float table's own rows, or an int8 table's
    codes times their row's scale plus its offset."""
    if not hasattr(table, "weight_qscale"):
        weight = table.weight
        return lambda rows: weight[rows] if isinstance(rows, int) else weight.index_select(0, rows)
    codes, scales, offsets = table.weight, table.weight_qscale, table.weight_qbias

    def dequantized(rows: int | torch.Tensor) -> torch.Tensor:
        if isinstance(rows, int):
            return torch.addcmul(offsets[rows].float(), codes[rows].float(), scales[rows].float())
        values, scale = codes.index_select(0, rows).float(), scales.index_select(0, rows).float()
        return torch.addcmul(offsets.index_select(0, rows).float(), values, scale)

    return dequantized


def _mean(rows: Rows, index: torch.Tensor) -> torch.Tensor:
    selected = rows(index)
    if not len(index):
        return selected.new_zeros(selected.shape[1])
    return selected.mean(0)


class UserVectorCache:
    """The user vectors of known users, for requests without ``recent_items`` (the vector
    then depends on the user and the model alone): those :meth:`fill` gave, then the most
    recently ranked. Least recently used first out; ``capacity`` 0 keeps nothing. A reload
    builds a new ranker and with it a new cache, so no vector outlives its model version."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"a user-vector cache holds 0 users or more, not {capacity}")
        self.capacity = capacity
        self.vectors: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def fill(self, users: np.ndarray, vectors: torch.Tensor) -> None:
        """Keep ``vectors[k]`` as user ``users[k]``'s vector, as many as there is room for,
        without counting lookups."""
        for user, vector in zip(users[: self.capacity].tolist(), vectors[: self.capacity]):
            self.vectors[user] = vector

    def get(self, user: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        vector = self.vectors.get(user)
        if vector is not None:
            self.hits += 1
            self.vectors.move_to_end(user)
            return vector
        self.misses += 1
        vector = compute()
        if self.capacity:
            self.vectors[user] = vector
            if len(self.vectors) > self.capacity:
                self.vectors.popitem(last=False)
        return vector
