"""A trained user tower answering one request at a time without torchrec's jagged tensors.

At batch size one, building ``KeyedJaggedTensor``s and running ``EmbeddingBagCollection``
over them costs several times the model's own arithmetic. :class:`PlainUserTower` reads the
same weight tensors (not copies: a row the server sets, such as the unknown user's mean, is
seen by both) with plain indexing and means, then runs the tower's own sequence encoder and
MLP. It is built from a trained :class:`~recdistill.models.Tower`, never trained itself;
``tests/test_inference.py`` checks it against the torchrec path.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection

from recdistill.models import HISTORY, RECENT, Tower


class PlainUserTower(nn.Module):
    """One user's vector from their index, history (item indices, newest first) and
    feature codes, as ``tower`` computes it from the user-side KJT."""

    def __init__(self, tower: Tower) -> None:
        super().__init__()
        if not supports(tower):
            raise ValueError("the plain path reads float embedding bags only")
        collection = tower.embeddings
        table_of = {
            feature: config.name
            for config in collection.embedding_bag_configs()
            for feature in config.feature_names
        }
        self.keys = tower.keys
        self.bags = [collection.embedding_bags[table_of[key]].weight for key in tower.keys]
        self.recent_length = tower.recent_length
        self.sequence = tower.sequence
        if self.sequence is not None:
            (table,) = self.sequence.embeddings.embeddings.values()
            self.sequence_table = table.weight
        self.mlp = tower.mlp

    @torch.inference_mode()
    def forward(self, user: int, history: torch.Tensor, codes: dict[str, int]) -> torch.Tensor:
        parts = []
        for key, weight in zip(self.keys, self.bags):
            if key == HISTORY:
                parts.append(_mean(weight, history))
            elif key == RECENT:
                parts.append(_mean(weight, history[: self.recent_length]))
            else:
                parts.append(weight[user if key == "user_id" else codes[key]])
        if self.sequence is not None:
            parts.append(self._sequence(history))
        return self.mlp(torch.cat(parts))

    def _sequence(self, history: torch.Tensor) -> torch.Tensor:
        sequence = self.sequence
        read = history[: sequence.max_length]
        embedded = torch.zeros(1, sequence.max_length, self.sequence_table.shape[1])
        embedded[0, : len(read)] = self.sequence_table[read]
        outputs, real = sequence.attend(embedded, torch.tensor([len(read)]))
        return sequence.read_out(outputs, real)[0]


def supports(tower: Tower) -> bool:
    """Whether ``tower``'s bags are float tables the plain path can read (not int8 ones)."""
    return isinstance(tower.embeddings, EmbeddingBagCollection)


def _mean(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    if not len(rows):
        return weight.new_zeros(weight.shape[1])
    return weight[rows].mean(0)
