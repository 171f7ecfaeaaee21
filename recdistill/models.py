"""Two-tower ranking models on torchrec embedding bags, built from one typed spec.

The user tower embeds ``user_id``, the ``history`` bag (mean-pooled) and each demographic
feature; the item tower embeds ``item_id`` and the ``genres`` bag (mean-pooled). Each tower
is an MLP over its concatenated embeddings; a candidate's score is the dot product of the
two tower outputs plus a learned per-item bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recdistill.data.batches import ITEM_KEYS, RankingBatch

BAG_FEATURES = ("history", "genres")


@dataclass(frozen=True)
class TwoTowerSpec:
    """Sizes of a two-tower model.

    ``tower`` lists the MLP widths of both towers, the last being the output dimension
    (empty: the concatenated embeddings are the output, so both sides must match in width);
    ``feature_dim`` is the embedding width of the small demographic tables.
    """

    embedding_dim: int = 16
    tower: tuple[int, ...] = (16,)
    feature_dim: int = 4
    dropout: float = 0.0


@dataclass(frozen=True)
class FeatureSpace:
    """The features a model is built for: KJT keys and their embedding table sizes."""

    user_features: tuple[str, ...]
    cardinalities: dict[str, int]


class Tower(nn.Module):
    """Embedding bags over one KJT, then an MLP (ReLU between layers, none after the last)."""

    def __init__(
        self, features: dict[str, tuple[int, int]], widths: tuple[int, ...], dropout: float
    ) -> None:
        super().__init__()
        self.keys = tuple(features)
        self.embeddings = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=f"table_{key}",
                    num_embeddings=size,
                    embedding_dim=dim,
                    feature_names=[key],
                    pooling=PoolingType.MEAN if key in BAG_FEATURES else PoolingType.SUM,
                )
                for key, (size, dim) in features.items()
            ],
            device=torch.device("cpu"),
        )
        layers: list[nn.Module] = []
        width = sum(dim for _, dim in features.values())
        for depth, out in enumerate(widths):
            layers.append(nn.Linear(width, out))
            if depth < len(widths) - 1:
                layers += [nn.ReLU(), nn.Dropout(dropout)]
            width = out
        self.mlp = nn.Sequential(*layers)
        self.output_dim = width

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.embeddings(features)
        if tuple(pooled.keys()) == self.keys:
            return self.mlp(pooled.values())
        # A sharded collection groups its features by shard placement, an int8 one by
        # pooling type: put them back in the order the first layer was built for.
        return self.mlp(torch.cat([pooled[key] for key in self.keys], dim=1))

    def multiply_adds(self) -> int:
        return sum(layer.in_features * layer.out_features for layer in self.linear_layers())

    def linear_layers(self) -> list[nn.Linear]:
        return [layer for layer in self.mlp if isinstance(layer, nn.Linear)]


class TwoTower(nn.Module):
    def __init__(self, spec: TwoTowerSpec, space: FeatureSpace) -> None:
        super().__init__()
        self.spec = spec
        self.space = space
        sizes = space.cardinalities
        wide = spec.embedding_dim
        user = {"user_id": (sizes["user_id"], wide), "history": (sizes["history"], wide)}
        user |= {name: (sizes[name], spec.feature_dim) for name in space.user_features}
        item = {key: (sizes[key], wide) for key in ITEM_KEYS}
        self.user_tower = Tower(user, spec.tower, spec.dropout)
        self.item_tower = Tower(item, spec.tower, spec.dropout)
        if self.user_tower.output_dim != self.item_tower.output_dim:
            raise ValueError(
                f"towers end in {self.user_tower.output_dim} and {self.item_tower.output_dim} "
                "dimensions; give the spec a tower whose last width both share"
            )
        self.item_bias = nn.Embedding(sizes["item_id"], 1)
        nn.init.zeros_(self.item_bias.weight)

    @property
    def output_dim(self) -> int:
        return self.user_tower.output_dim

    def towers(self, batch: RankingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """User vectors ``[lists, dim]`` and the batch's distinct item vectors ``[items, dim]``."""
        return self.user_tower(batch.users), self.item_tower(batch.items)

    def score(self, users: torch.Tensor, items: torch.Tensor, batch: RankingBatch) -> torch.Tensor:
        """Scores ``[lists, list_size]`` from tower outputs.

        Every list is scored against all of the batch's distinct items, then its candidates
        are gathered: unlike indexing the item vectors per slot, whose backward pass adds
        into shared rows from several threads, this keeps training bit-reproducible.
        """
        item_bias = self.item_bias(batch.items["item_id"].values()).squeeze(-1)
        return (users @ items.T + item_bias).gather(1, batch.candidates)

    def forward(self, batch: RankingBatch) -> torch.Tensor:
        users, items = self.towers(batch)
        return self.score(users, items, batch)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def multiply_adds(self, list_size: int = 100) -> dict[str, float]:
        """Multiply-adds of the dense part (embedding look-ups and pooling not counted).

        ``per_candidate`` charges each scored candidate its item tower, the dot product and
        its share of one user-tower pass over a list of ``list_size`` candidates.
        """
        user, item = self.user_tower.multiply_adds(), self.item_tower.multiply_adds()
        return {
            "user_tower": user,
            "item_tower": item,
            "per_candidate": item + self.output_dim + user / list_size,
        }
