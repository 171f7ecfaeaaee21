"""Yardsticks printed beside the real ranker by ``benchmarks/serving_latency.py``.

- :class:`NumpyReference` ranks a request as ``OnlineRanker(artifact)``
  does for a known user without ``recent_items`` and known candidates, in plain numpy: the
  user tower runs per request (embedding rows and means, the sequence encoder's causal
  self-attention, the MLP), the catalogue's item vectors and biases are precomputed at
  construction. The ranker's time above it is what torch and the framework add to the
  arithmetic.
- :func:`bare_app` is a FastAPI app whose ``POST /rank`` parses the real request model and
  answers fixed bytes, timing itself from request received to response ready as the real
  server does: the floor of the server column.

``benchmarks/serving_latency.py`` checks that the reference's scores agree with the ranker's
to 1e-4 before it times them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send
from threadpoolctl import threadpool_limits
from torch import nn

from recdistill.artifact import Artifact
from recdistill.models import HISTORY, RECENT, SequenceEncoder
from recdistill.online import OnlineRanker
from serving.schemas import RankRequest

FIXED_RESPONSE = b'{"items":[]}'


def use_one_thread() -> None:
    """Torch and numpy's BLAS on one thread each, as a served request runs. Left to its
    default (a thread per core), numpy's OpenBLAS put the p99 of the ml-100k teacher's
    reference at 130 ms on a shared two-core machine, against 5 ms on one thread."""
    torch.set_num_threads(1)
    threadpool_limits(1, user_api="blas")


def copied(tensor: torch.Tensor) -> np.ndarray:
    """A float32 numpy copy of ``tensor``, C-contiguous."""
    return np.array(tensor.detach().numpy(), dtype=np.float32, order="C")


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def mean_rows(table: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The mean of ``table``'s ``rows``, zeros for none (as an empty mean-pooled bag)."""
    if not len(rows):
        return np.zeros(table.shape[1], dtype=np.float32)
    return table[rows].mean(axis=0)


@dataclass(frozen=True)
class Dense:
    """``nn.Linear`` as ``x @ weight + bias``, its weight stored transposed."""

    weight: np.ndarray
    bias: np.ndarray

    @classmethod
    def of(cls, layer: nn.Linear) -> Dense:
        return cls(copied(layer.weight.T), copied(layer.bias))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight + self.bias


@dataclass(frozen=True)
class Norm:
    """``nn.LayerNorm`` over the last axis."""

    weight: np.ndarray
    bias: np.ndarray
    eps: float

    @classmethod
    def of(cls, norm: nn.LayerNorm) -> Norm:
        return cls(copied(norm.weight), copied(norm.bias), norm.eps)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        centred = x - x.mean(axis=-1, keepdims=True)
        variance = (centred * centred).mean(axis=-1, keepdims=True)
        return centred / np.sqrt(variance + self.eps) * self.weight + self.bias


@dataclass(frozen=True)
class EncoderLayer:
    """A ``norm_first`` ``nn.TransformerEncoderLayer`` with a ReLU feed-forward, in eval mode."""

    attention_norm: Norm
    in_projection: Dense
    out_projection: Dense
    heads: int
    feed_forward_norm: Norm
    expand: Dense
    contract: Dense

    @classmethod
    def of(cls, layer: nn.TransformerEncoderLayer) -> EncoderLayer:
        attention = layer.self_attn
        return cls(
            attention_norm=Norm.of(layer.norm1),
            in_projection=Dense(copied(attention.in_proj_weight.T), copied(attention.in_proj_bias)),
            out_projection=Dense.of(attention.out_proj),
            heads=attention.num_heads,
            feed_forward_norm=Norm.of(layer.norm2),
            expand=Dense.of(layer.linear1),
            contract=Dense.of(layer.linear2),
        )

    def __call__(self, x: np.ndarray, blocked: np.ndarray) -> np.ndarray:
        x = x + self.self_attention(self.attention_norm(x), blocked)
        return x + self.contract(relu(self.expand(self.feed_forward_norm(x))))

    def self_attention(self, x: np.ndarray, blocked: np.ndarray) -> np.ndarray:
        """Multi-head attention of ``x`` ``[length, dim]`` over itself; ``blocked`` is added
        to the logits (-inf where a position may not attend)."""
        length, dim = x.shape
        queries, keys, values = (
            part.reshape(length, self.heads, -1).transpose(1, 0, 2)  # [heads, length, dim/heads]
            for part in np.split(self.in_projection(x), 3, axis=1)
        )
        logits = queries @ keys.transpose(0, 2, 1) * (dim // self.heads) ** -0.5 + blocked
        attended = softmax(logits) @ values
        return self.out_projection(attended.transpose(1, 0, 2).reshape(length, dim))


class NumpySequenceEncoder:
    """:class:`recdistill.models.SequenceEncoder` over one history, its real positions only."""

    def __init__(self, encoder: SequenceEncoder) -> None:
        (table,) = encoder.embeddings.embeddings.values()
        self.item_rows = copied(table.weight)
        self.position_rows = copied(encoder.position.weight)
        self.max_length = encoder.max_length
        self.layers = [EncoderLayer.of(layer) for layer in encoder.attention.layers]
        self.norm = Norm.of(encoder.norm)
        self.query = copied(encoder.query) if encoder.readout == "attention" else None
        # Position j attends to itself and older positions k > j: logits below the diagonal
        # are blocked.
        self.blocked = np.tril(np.full((self.max_length,) * 2, -np.inf, dtype=np.float32), -1)

    def __call__(self, history: np.ndarray) -> np.ndarray:
        """The user vector part read from ``history`` (item indices, newest first)."""
        read = history[: self.max_length]
        length = max(len(read), 1)  # an empty history reads one zero embedding
        # Slot j (newest first) has age-order position length - 1 - j.
        x = self.position_rows[length - 1 :: -1].copy()
        x[: len(read)] += self.item_rows[read]
        blocked = self.blocked[:length, :length]
        for layer in self.layers:
            x = layer(x, blocked)
        outputs = self.norm(x)
        if self.query is None:  # readout "last": the newest position
            return outputs[0]
        return softmax(outputs @ self.query) @ outputs


class NumpyReference:
    """Ranks like ``OnlineRanker(artifact).rank(user_id, candidates)``
    for a known user without recent items and known candidates, in numpy.

    The weights are copied at construction; the item vectors and biases of the whole
    catalogue are taken once from an ``OnlineRanker`` (the torch item tower). Per request only
    the user tower and the scores are computed.
    """

    def __init__(self, artifact: Artifact) -> None:
        model = artifact.model
        if model is None or artifact.quantization is not None:
            quantized = " (int8)" if artifact.quantization is not None else ""
            raise ValueError(
                f"{artifact.directory}: the numpy reference needs a float two-tower artifact, "
                f"not {artifact.kind}{quantized}"
            )
        ranker = OnlineRanker(artifact, user_cache=0)
        self.store = artifact.store
        self.item_vectors = copied(ranker.item_vectors)
        self.item_bias = copied(ranker.item_bias)
        tower = model.user_tower
        table_of = {
            feature: config.name
            for config in tower.embeddings.embedding_bag_configs()
            for feature in config.feature_names
        }
        self.keys = tower.keys
        # The recent bag reads the history's table.
        self.tables = {
            key: copied(tower.embeddings.embedding_bags[table_of[key]].weight)
            for key in tower.keys
            if key != RECENT
        }
        self.recent_length = tower.recent_length
        self.sequence = None if tower.sequence is None else NumpySequenceEncoder(tower.sequence)
        self.mlp = [Dense.of(layer) for layer in tower.linear_layers()]

    def rank(self, user_id: int, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``candidates`` (external IDs) sorted by score, descending, and their scores."""
        store = self.store
        candidates = np.asarray(candidates)
        items = store.items.index(store.item_ids.lookup(candidates))
        user = int(store.users.index(store.user_ids.lookup(np.array([user_id])))[0])
        offsets = store.history.offsets
        history = store.history.values[offsets[user] : offsets[user + 1]][: store.history_length]
        scores = self.item_vectors[items] @ self.user_vector(user, history) + self.item_bias[items]
        order = np.argsort(-scores, kind="stable")
        return candidates[order], scores[order]

    def user_vector(self, user: int, history: np.ndarray) -> np.ndarray:
        """The user tower's output for user index ``user`` reading ``history`` (item indices,
        newest first)."""
        parts = []
        for key in self.keys:
            if key == HISTORY:
                parts.append(mean_rows(self.tables[HISTORY], history))
            elif key == RECENT:
                parts.append(mean_rows(self.tables[HISTORY], history[: self.recent_length]))
            elif key == "user_id":
                parts.append(self.tables[key][user])
            else:
                parts.append(self.tables[key][self.store.user_codes[key][user]])
        if self.sequence is not None:
            parts.append(self.sequence(history))
        x = np.concatenate(parts)
        for depth, layer in enumerate(self.mlp):
            x = layer(x)
            if depth < len(self.mlp) - 1:
                x = relu(x)
        return x


class ReceivedAt:
    """Stamps ``request.state.received_at`` as the real app's ``RequestCounter`` does."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})["received_at"] = time.perf_counter()
        await self.app(scope, receive, send)


def bare_app() -> FastAPI:
    """An app whose ``POST /rank`` parses a :class:`RankRequest` and answers fixed bytes.

    Each request's server-side latency in seconds, from received to response ready as the
    real server measures it, is appended to ``app.state.latencies``.
    """
    app = FastAPI(title="bare /rank")
    app.add_middleware(ReceivedAt)
    latencies: list[float] = []
    app.state.latencies = latencies

    @app.post("/rank")
    async def rank(body: RankRequest, request: Request) -> Response:
        latencies.append(time.perf_counter() - request.state.received_at)
        return Response(FIXED_RESPONSE, media_type="application/json")

    return app
