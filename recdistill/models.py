"""Two-tower ranking models on torchrec embeddings, built from one typed spec.

The user tower embeds ``user_id``, the user's ``history`` and each demographic feature; the
item tower embeds ``item_id`` and the ``genres`` bag (mean-pooled). Each tower is an MLP over
its concatenated embeddings; a candidate's score is the dot product of the two tower outputs
plus a learned per-item bias.

The history is read by one of two user encoders, chosen per preset:

- ``"bag"`` (the default): a mean-pooled embedding bag (torchrec ``EmbeddingBagCollection``).
  With ``recent_length`` > 0 a second bag pools the ``recent_length`` newest items alone,
  looked up in the same table (a cheap view of what the user did last, without a table of
  its own).
- ``"sequence"``: the ``max_length`` most recent items, unpooled (torchrec
  ``EmbeddingCollection``), plus learned position embeddings (0 = the oldest read), through
  causal self-attention layers: position ``j`` attends to itself and older items only, so
  its output summarises the history as it was before the item at ``j - 1`` arrived. That
  makes every position a next-item prediction (:meth:`TwoTower.next_item_scores`); the
  user vector reads the most recent position (``readout = "last"``) or pools every position
  with a learned attention query (``readout = "attention"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    PoolingType,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recdistill.data.feature_store import ITEM_KEYS, RankingBatch, SequenceBatch

HISTORY = "history"
RECENT = "recent"
BAG_FEATURES = (HISTORY, RECENT, "genres")
USER_ENCODERS = ("bag", "sequence")
READOUTS = ("last", "attention")


@dataclass(frozen=True)
class TwoTowerSpec:
    """Sizes of a two-tower model.

    ``tower`` lists the MLP widths of both towers, the last being the output dimension
    (empty: the concatenated embeddings are the output, so both sides must match in width);
    ``feature_dim`` is the embedding width of the small demographic tables.

    ``user_encoder`` reads the history as a ``"bag"`` or a ``"sequence"``; a sequence
    encoder looks at the ``max_length`` most recent items through ``layers`` self-attention
    layers of ``heads`` heads each (``heads`` must divide ``embedding_dim``) and reads them out
    as ``readout`` says. A bag encoder with ``recent_length`` > 0 also pools the
    ``recent_length`` newest items of the history on their own. ``user_table = False`` leaves
    out the ``user_id`` table: users are known by their history and features alone (the table
    is most of a small model's parameters, and grows with the users).
    """

    embedding_dim: int = 16
    tower: tuple[int, ...] = (16,)
    feature_dim: int = 4
    dropout: float = 0.0
    user_encoder: str = "bag"
    max_length: int = 50
    layers: int = 2
    heads: int = 2
    readout: str = "last"
    recent_length: int = 0
    user_table: bool = True

    def __post_init__(self) -> None:
        if self.user_encoder not in USER_ENCODERS:
            raise ValueError(
                f"unknown user_encoder {self.user_encoder!r}; choose one of {list(USER_ENCODERS)}"
            )
        if self.recent_length < 0:
            raise ValueError(f"recent_length must be 0 (none) or more, not {self.recent_length}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be at least 0 and below 1, not {self.dropout}")
        if self.user_encoder != "sequence":
            return
        if self.recent_length:
            raise ValueError(
                "recent_length is a second bag of the bag encoder; a sequence encoder "
                "already reads the order of the history"
            )
        if self.max_length <= 0:
            raise ValueError(f"max_length must be at least 1, not {self.max_length}")
        if self.layers <= 0:
            raise ValueError(f"layers must be at least 1, not {self.layers}")
        if self.heads <= 0 or self.embedding_dim < self.heads:
            raise ValueError(
                f"a sequence encoder of embedding_dim {self.embedding_dim} cannot have "
                f"{self.heads} heads: each head needs at least one dimension"
            )
        if self.embedding_dim % self.heads:
            raise ValueError(
                f"heads ({self.heads}) must divide embedding_dim ({self.embedding_dim})"
            )
        if self.readout not in READOUTS:
            raise ValueError(f"unknown readout {self.readout!r}; choose one of {list(READOUTS)}")

    @property
    def is_sequence(self) -> bool:
        return self.user_encoder == "sequence"


@dataclass(frozen=True)
class FeatureSpace:
    """The features a model is built for: KJT keys and their embedding table sizes."""

    user_features: tuple[str, ...]
    cardinalities: dict[str, int]

    @classmethod
    def of(cls, store: Any) -> FeatureSpace:
        """The features of a :class:`~recdistill.data.feature_store.FeatureStore`."""
        return cls(store.user_features, store.cardinalities())


class Dropout(nn.Module):
    """``nn.Dropout`` with its mask cut from 64-bit random integers, four 16-bit draws each.

    torch's CPU samplers draw one number per element: its Bernoulli sampler made dropout a
    quarter of the sequence teacher's training step, and uniform draws still cost 5× what
    slicing 64-bit draws does. An element is kept where its 16-bit draw is at least
    ``threshold``, so ``p`` is honoured to 1 / 65,536.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout must be at least 0 and below 1, not {p}")
        self.p = p
        self.threshold = round(p * 2**16) - 2**15  # int16 draws are uniform on [-2^15, 2^15)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device)
        draws = words.random_(-(2**63), None).view(torch.int16)[: x.numel()].view(x.shape)
        return x * ((draws >= self.threshold) * (1 / (1 - self.p)))


class SequenceEncoder(nn.Module):
    """Causal self-attention over the most recent ``max_length`` items of ``history``.

    :meth:`positions` gives every position's output ``[B, max_length, dim]`` and the mask
    of real (non-padding) positions; :meth:`forward` reads them out to ``[B, dim]``. An empty
    history reads a zero embedding at position 0, so no row is all padding.
    """

    def __init__(self, items: int, spec: TwoTowerSpec) -> None:
        super().__init__()
        dim = spec.embedding_dim
        self.max_length = spec.max_length
        self.readout = spec.readout
        self.embeddings = EmbeddingCollection(
            tables=[
                EmbeddingConfig(
                    name=f"table_{HISTORY}_sequence",
                    num_embeddings=items,
                    embedding_dim=dim,
                    feature_names=[HISTORY],
                )
            ],
            device=torch.device("cpu"),
        )
        self.position = nn.Embedding(spec.max_length, dim)
        self.dropout = Dropout(spec.dropout)
        layer = nn.TransformerEncoderLayer(
            dim, spec.heads, 2 * dim, spec.dropout, batch_first=True, norm_first=True
        )
        layer.dropout, layer.dropout1, layer.dropout2 = (Dropout(spec.dropout) for _ in range(3))
        self.attention = nn.TransformerEncoder(layer, spec.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.heads = spec.heads
        # Position j may attend to itself and to older real items (k > j).
        self.register_buffer(
            "older",
            torch.ones(spec.max_length, spec.max_length, dtype=torch.bool).triu(1),
            persistent=False,
        )
        if spec.readout == "attention":
            self.query = nn.Parameter(torch.zeros(dim))

    @property
    def output_dim(self) -> int:
        return self.position.embedding_dim

    def multiply_adds(self) -> int:
        """Per user at full length: each layer's four projections, its attention scores
        and weighted sum, and its two feed-forward layers (width 2 × dim)."""
        dim, length = self.output_dim, self.max_length
        per_layer = 4 * dim * dim * length + 2 * length * length * dim + 4 * dim * dim * length
        return len(self.attention.layers) * per_layer

    def positions(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        history = self.embeddings(features)[HISTORY]
        embedded = torch.ops.fbgemm.jagged_to_padded_dense(
            history.values(), [history.offsets()], [self.max_length], 0.0
        )
        return self.attend(embedded, history.lengths())

    def attend(
        self, embedded: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every position's output from the history's embeddings ``[B, slots, dim]`` (newest
        first, zero-padded; at most ``max_length`` slots: a single history needs no more than
        its own length) and the history lengths."""
        width = embedded.shape[1]
        lengths = lengths.clamp(max=width, min=1)
        slots = torch.arange(width, device=lengths.device)
        real = slots < lengths[:, None]
        # Positions count from the oldest item read, so that position j's output is exactly
        # the user vector of the history as it stood before item j - 1 arrived.
        age_order = (lengths[:, None] - 1 - slots).clamp(min=0)
        x = self.dropout(embedded + self.position(age_order)) * real[..., None]
        # A padding position attends to itself alone: no row of the mask is all blocked,
        # which would make its softmax (and every gradient through it) NaN.
        allowed = (self.older[:width, :width] & real[:, None, :]) | torch.eye(
            width, dtype=torch.bool, device=lengths.device
        )
        blocked = (~allowed).repeat_interleave(self.heads, dim=0)
        return self.norm(self.attention(x, mask=blocked)), real

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.read_out(*self.positions(features))

    def read_out(self, outputs: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """The user vector ``[B, dim]`` from every position's output and the real ones."""
        if self.readout == "last":
            return outputs[:, 0]
        weights = (outputs @ self.query).masked_fill(~real, -torch.inf).softmax(dim=1)
        return (weights[..., None] * outputs).sum(dim=1)


class Tower(nn.Module):
    """Embeddings over one KJT, then an MLP (ReLU between layers, none after the last).

    ``features`` maps KJT keys to (table size, width) for the embedding bags; ``sequence``,
    when given, reads the ``history`` key instead of a bag. ``recent_length`` > 0 adds the
    ``recent`` bag: the newest ``recent_length`` items of ``history``, in the history's table.
    """

    def __init__(
        self,
        features: dict[str, tuple[int, int]],
        widths: tuple[int, ...],
        dropout: float,
        sequence: SequenceEncoder | None = None,
        recent_length: int = 0,
    ) -> None:
        super().__init__()
        self.recent_length = recent_length
        shared = {HISTORY: [HISTORY, RECENT]} if recent_length else {}
        self.keys = tuple(name for key in features for name in shared.get(key, [key]))
        self.embeddings = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=f"table_{key}",
                    num_embeddings=size,
                    embedding_dim=dim,
                    feature_names=shared.get(key, [key]),
                    pooling=PoolingType.MEAN if key in BAG_FEATURES else PoolingType.SUM,
                )
                for key, (size, dim) in features.items()
            ],
            device=torch.device("cpu"),
        )
        self.sequence = sequence
        layers: list[nn.Module] = []
        width = sum(dim for _, dim in features.values()) + (
            features[HISTORY][1] if recent_length else 0
        )
        if sequence is not None:
            width += sequence.output_dim
        for depth, out in enumerate(widths):
            layers.append(nn.Linear(width, out))
            if depth < len(widths) - 1:
                layers += [nn.ReLU(), Dropout(dropout)]
            width = out
        self.mlp = nn.Sequential(*layers)
        self.output_dim = width

    def bag_tables(self) -> list[nn.Module]:
        """The embedding-bag table each of ``keys`` reads, in that order (``recent`` reads
        the history's)."""
        table_of = {
            feature: config.name
            for config in self.embeddings.embedding_bag_configs()
            for feature in config.feature_names
        }
        return [self.embeddings.embedding_bags[table_of[key]] for key in self.keys]

    def pooled(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """The embedding bags' outputs ``[B, width]``, in the order the MLP was built for."""
        if self.recent_length:
            features = with_recent(features, self.recent_length)
        pooled = self.embeddings(features)
        if tuple(pooled.keys()) == self.keys:
            return pooled.values()
        # A sharded collection groups its features by shard placement, an int8 one by
        # pooling type: put them back in the order the first layer was built for.
        return torch.cat([pooled[key] for key in self.keys], dim=1)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.pooled(features)
        if self.sequence is not None:
            pooled = torch.cat([pooled, self.sequence(features)], dim=1)
        return self.mlp(pooled)

    def positions(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A sequence tower's output at every history position ``[B, L, out]``, and the mask
        of real positions: position ``j``'s output is the user vector for predicting the
        item that came after history item ``j``."""
        if self.sequence is None:
            raise ValueError("only a sequence user encoder has an output per position")
        outputs, real = self.sequence.positions(features)
        pooled = self.pooled(features)[:, None].expand(-1, outputs.shape[1], -1)
        return self.mlp(torch.cat([pooled, outputs], dim=2)), real

    def multiply_adds(self) -> int:
        mlp = sum(layer.in_features * layer.out_features for layer in self.linear_layers())
        return mlp + (0 if self.sequence is None else self.sequence.multiply_adds())

    def linear_layers(self) -> list[nn.Linear]:
        return [layer for layer in self.mlp if isinstance(layer, nn.Linear)]


def with_recent(features: KeyedJaggedTensor, length: int) -> KeyedJaggedTensor:
    """``features`` plus the ``recent`` key: each row's first ``length`` history items (the
    history lists the newest first)."""
    history = features[HISTORY]
    lengths = history.lengths().clamp(max=length)
    row_starts = torch.repeat_interleave(history.offsets()[:-1], lengths)
    within_row = torch.arange(int(lengths.sum()), device=lengths.device) - torch.repeat_interleave(
        lengths.cumsum(0) - lengths, lengths
    )
    recent = KeyedJaggedTensor.from_lengths_sync(
        keys=[RECENT], values=history.values()[row_starts + within_row], lengths=lengths
    )
    return KeyedJaggedTensor.concat([features, recent])


class TwoTower(nn.Module):
    """A two-tower ranker: a candidate's score is ``user_tower · item_tower + item_bias``.

    Built from a spec (its sizes) and a feature space (the data's keys and table sizes):

    >>> space = FeatureSpace(
    ...     user_features=("gender",),
    ...     cardinalities={"user_id": 101, "history": 51, "gender": 3, "item_id": 51, "genres": 19},
    ... )
    >>> model = TwoTower(TwoTowerSpec(embedding_dim=8, tower=(16, 8)), space)
    >>> model.parameter_count()
    2719
    >>> model.multiply_adds(list_size=100)["per_candidate"]
    396.48

    On a data directory the space comes from its feature store, and the model scores batches
    of candidate lists::

        store = FeatureStore(Path("data/synthetic"))
        model = TwoTower(TwoTowerSpec(), FeatureSpace.of(store))
        batch = next(iter(CandidateLists(store, "test", batch_size=64)))
        scores = model(batch)  # [64, 100]: each list's candidates, the held-out item first
    """

    def __init__(self, spec: TwoTowerSpec, space: FeatureSpace) -> None:
        super().__init__()
        self.spec = spec
        self.space = space
        sizes = space.cardinalities
        wide = spec.embedding_dim
        user = {"user_id": (sizes["user_id"], wide)} if spec.user_table else {}
        sequence = None
        if spec.is_sequence:
            sequence = SequenceEncoder(sizes[HISTORY], spec)
        else:
            user[HISTORY] = (sizes[HISTORY], wide)
        user |= {name: (sizes[name], spec.feature_dim) for name in space.user_features}
        item = {key: (sizes[key], wide) for key in ITEM_KEYS}
        self.user_tower = Tower(user, spec.tower, spec.dropout, sequence, spec.recent_length)
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

    def next_item_scores(self, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores at every real position of the batch's sequences, and the matching labels,
        for next-item training (SASRec): ``[targets, 1 + negatives]`` (the target first), or
        with no negatives ``[targets, items]`` over all of the batch's items (the catalogue),
        the target's column labelled. Item vectors are computed once per batch."""
        users, real = self.user_tower.positions(batch.users)
        items = self.item_tower(batch.items)
        item_bias = self.item_bias(batch.items["item_id"].values()).squeeze(-1)
        kept = real & batch.has_target
        if batch.negatives.shape[1] == 0:
            lists = users[kept] @ items.T + item_bias
            labels = torch.zeros_like(lists)
            labels[torch.arange(len(lists)), batch.targets[kept]] = 1.0
            return lists, labels
        scores = users @ items.T + item_bias
        target = scores.gather(2, batch.targets[..., None])
        negatives = scores.gather(2, batch.negatives[:, None, :].expand(-1, users.shape[1], -1))
        lists = torch.cat([target, negatives], dim=2)[kept]
        labels = torch.zeros_like(lists)
        labels[:, 0] = 1.0
        return lists, labels

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
