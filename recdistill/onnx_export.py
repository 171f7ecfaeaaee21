"""A two-tower model out as ONNX, in the teacher contract's tensor form.

``recdistill export --format onnx`` writes what another serving stack (ONNX Runtime, Triton,
a JVM service) needs to rank as ``POST /rank`` does: one graph that scores candidates over
precomputed item vectors, and the vocabularies that turn the user's own IDs into its indices.
The graph reads ``user``, ``history``, ``history_length``, ``candidates`` and a
``feature_NAME`` per user feature (``recdistill.external.contract``), and gives ``scores``,
``user_vector`` and ``item_vectors``, so the same folder is also an ``onnx`` teacher any run
can learn from (``teacher.toml`` holds its ``[teachers.*]`` table).

The graph is the served ranker's arithmetic on plain tensors (:class:`ScoringGraph`, checked
against the torchrec model): the user tower reads the model's own weights, with the unknown
rows of its user-side tables set to their means as the server sets them; the item vectors
and biases are the server's, an unknown item (index 0) scored as the mean item; a user at
index 0 with an empty history gets the server's mean user vector. The caller sends the
user's history as the server builds it: the request's recent items, then the user's known
history, newest first, cut to ``history_length``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from recdistill.errors import MissingExtra
from recdistill.external.contract import (
    CANDIDATES,
    FEATURE_PREFIX,
    HISTORY,
    HISTORY_LENGTH,
    ITEM_VECTORS,
    SCORES,
    USER,
    USER_VECTOR,
)
from recdistill.files import atomic_output_dir, write_json
from recdistill.layout import OnnxLayout
from recdistill.models import RECENT, SequenceEncoder, Tower
from recdistill.online import OnlineRanker
from recdistill.toml_writer import dumps

# The ONNX opset the graphs are written for.
OPSET = 18


class ScoringGraph(nn.Module):
    """A loaded two-tower ranker as plain tensor arithmetic over a batch of lists.

    ``answer`` takes the tensor form's inputs by name and returns its outputs; the module's
    ``forward`` (made by :func:`with_inputs`) names them one by one for the exporter.
    """

    def __init__(self, ranker: OnlineRanker) -> None:
        super().__init__()
        model = ranker.artifact.model
        tower: Tower = model.user_tower
        self.keys = tower.keys
        for position, table in enumerate(tower.bag_tables()):
            self.register_buffer(f"table_{position}", table.weight.detach().clone())
        self.recent_length = tower.recent_length
        self.sequence = tower.sequence
        if self.sequence is not None:
            (table,) = self.sequence.embeddings.embeddings.values()
            self.register_buffer("sequence_table", table.weight.detach().clone())
        self.mlp = tower.mlp
        self.features = ranker.store.user_features
        self.register_buffer("item_table", ranker.item_vectors.detach().clone())
        self.register_buffer("item_bias", ranker.item_bias.detach().clone())
        self.register_buffer("mean_user", ranker.mean_user.detach().clone())

    @staticmethod
    def input_names(features: tuple[str, ...]) -> tuple[str, ...]:
        return (USER, HISTORY, HISTORY_LENGTH, CANDIDATES, *(FEATURE_PREFIX + f for f in features))

    def answer(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        user, candidates = inputs[USER], inputs[CANDIDATES]
        history, lengths = inputs[HISTORY], inputs[HISTORY_LENGTH]
        vectors = self.user_vectors(user, history, lengths, inputs)
        cold = ((user == 0) & (lengths == 0))[:, None]
        vectors = torch.where(cold, self.mean_user[None, :], vectors)
        items = self.item_table[candidates]
        scores = (items @ vectors[:, :, None])[..., 0] + self.item_bias[candidates]
        return {SCORES: scores, USER_VECTOR: vectors, ITEM_VECTORS: items}

    def user_vectors(
        self,
        user: torch.Tensor,
        history: torch.Tensor,
        lengths: torch.Tensor,
        inputs: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        parts = []
        slots = torch.arange(history.shape[1], device=history.device)
        for position, key in enumerate(self.keys):
            table = getattr(self, f"table_{position}")
            if key == HISTORY:
                parts.append(_bag_mean(table, history, slots[None, :] < lengths[:, None]))
            elif key == RECENT:
                recent = slots[None, :] < lengths.clamp(max=self.recent_length)[:, None]
                parts.append(_bag_mean(table, history, recent))
            elif key == "user_id":
                parts.append(table[user])
            else:
                parts.append(table[inputs[FEATURE_PREFIX + key]])
        if self.sequence is not None:
            parts.append(self._sequence(history, lengths))
        return self.mlp(torch.cat(parts, dim=1))

    def _sequence(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        encoder: SequenceEncoder = self.sequence
        width = encoder.max_length
        read = history[:, :width]
        slots = torch.arange(read.shape[1], device=read.device)
        present = slots[None, :] < lengths[:, None]
        embedded = self.sequence_table[read] * present[..., None]
        clamped = lengths.clamp(max=read.shape[1], min=1)
        real = slots[None, :] < clamped[:, None]
        age = (clamped[:, None] - 1 - slots[None, :]).clamp(min=0)
        x = (embedded + encoder.position(age)) * real[..., None]
        older = slots[None, :] > slots[:, None]
        allowed = (older[None] & real[:, None, :]) | (slots[:, None] == slots[None, :])[None]
        for layer in encoder.attention.layers:
            x = x + _attention(layer.self_attn, layer.norm1(x), ~allowed, encoder.heads)
            x = x + layer.linear2(F.relu(layer.linear1(layer.norm2(x))))
        outputs = encoder.norm(x)
        return encoder.read_out(outputs, real)


def _bag_mean(table: torch.Tensor, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``table``'s rows of ``items`` where ``mask`` (zeros for an empty bag)."""
    rows = table[items] * mask[..., None]
    return rows.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


def _attention(
    attention: nn.MultiheadAttention, x: torch.Tensor, blocked: torch.Tensor, heads: int
) -> torch.Tensor:
    """``attention``'s self-attention of ``x`` ``[B, L, D]``, ``blocked`` ``[B, L, L]``
    masking what a position may not see: the arithmetic ``nn.MultiheadAttention`` does,
    written so that the exporter keeps the batch free."""
    batch, length, dim = x.shape
    q, k, v = F.linear(x, attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, length, heads, -1).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    weights = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    weights = weights.masked_fill(blocked[:, None], -torch.inf).softmax(-1)
    return attention.out_proj((weights @ v).transpose(1, 2).reshape(batch, length, dim))


def scoring_graph(ranker: OnlineRanker) -> ScoringGraph:
    """``ranker``'s graph, its ``forward`` taking each input by name, so that the ONNX
    graph's inputs carry the contract's names (``feature_NAME`` ones vary with the data)."""
    names = ScoringGraph.input_names(ranker.store.user_features)
    source = f"def forward(self, {', '.join(names)}):\n"
    source += f"    return self.answer({{{', '.join(f'{n!r}: {n}' for n in names)}}})\n"
    namespace: dict = {}
    exec(source, namespace)  # noqa: S102 - the names are the contract's and the data's features
    named = type("NamedScoringGraph", (ScoringGraph,), {"forward": namespace["forward"]})
    return named(ranker).eval()


def export_onnx(ranker: OnlineRanker, out: Path, name: str) -> OnnxLayout:
    """Write ``ranker``'s model as ONNX with its vocabularies into folder ``out``."""
    try:
        import onnx  # noqa: F401 - the exporter needs it
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise MissingExtra(
            "ONNX export needs onnx and onnxscript: pip install 'recdistill[onnx]'"
        ) from error
    model = ranker.artifact.model
    if model is None or ranker.artifact.quantization is not None:
        raise ValueError(
            f"{name}: --format onnx exports a float two-tower model; {ranker.artifact.kind}"
            f"{' (int8)' if ranker.artifact.quantization is not None else ''} is not one"
        )
    graph = scoring_graph(ranker)
    store = ranker.store
    example = _example(graph, store.history_length)
    batch, candidates = torch.export.Dim("lists"), torch.export.Dim("candidates")
    dynamic = {key: {0: batch} for key in example} | {CANDIDATES: {0: batch, 1: candidates}}
    with atomic_output_dir(Path(out)) as scratch:
        layout = OnnxLayout(scratch)
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                graph,
                (),
                kwargs=example,
                input_names=list(example),
                output_names=[SCORES, USER_VECTOR, ITEM_VECTORS],
                dynamic_shapes=dynamic,
                opset_version=OPSET,
                dynamo=True,
                verbose=False,
            )
        program.save(str(layout.model))
        vocabulary = _write_vocabularies(ranker, layout)
        write_json(
            layout.contract,
            {
                "model": name,
                "version": ranker.version,
                "inputs": {key: list(value.shape) for key, value in example.items()},
                "outputs": [SCORES, USER_VECTOR, ITEM_VECTORS],
                "history_length": store.history_length,
                "vocabulary": {
                    key: str(path.relative_to(scratch)) for key, path in vocabulary.items()
                },
            },
        )
        final = Path(out).resolve()
        table = {
            "kind": "onnx",
            "path": str(final / layout.model.name),
            "vocabulary": {k: str(final / p.relative_to(scratch)) for k, p in vocabulary.items()},
        }
        layout.teacher.write_text(dumps({("teachers", name): table}))
    return OnnxLayout(Path(out))


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's notes on operators this graph does not use (torchvision's) and on its
    own deprecations are not the user's concern."""
    exporter = logging.getLogger("torch.onnx")
    level = exporter.level
    exporter.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        exporter.setLevel(level)


def _example(graph: ScoringGraph, history_length: int) -> dict[str, torch.Tensor]:
    """Inputs of two lists to trace the graph with (the batch and candidates stay free)."""
    example = {
        USER: torch.tensor([1, 0]),
        HISTORY: torch.ones((2, history_length), dtype=torch.int64),
        HISTORY_LENGTH: torch.tensor([history_length, 0]),
        CANDIDATES: torch.ones((2, 3), dtype=torch.int64),
    }
    return example | {FEATURE_PREFIX + f: torch.tensor([1, 0]) for f in graph.features}


def _write_vocabularies(ranker: OnlineRanker, layout: OnnxLayout) -> dict[str, Path]:
    """Per ID kind a one-column table, row ``k`` the ID of index ``k`` (row 0, unknown, null)."""
    store = ranker.store
    columns = {
        "item_id": store.item_ids.named(store.items.values),
        "user_id": store.user_ids.named(store.users.values),
    }
    columns |= {name: v.values.tolist() for name, v in store.feature_vocabularies.items()}
    layout.vocabulary.mkdir()
    written = {}
    for key, values in columns.items():
        path = layout.vocabulary / f"{key}.parquet"
        pq.write_table(pa.table({"id": pa.array([None, *values])}), path)
        written[key] = path
    return written
