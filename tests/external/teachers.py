"""Teachers written as a team outside recdistill would write them: plain PyTorch and numpy,
no recdistill classes, meeting the teacher contract (recdistill/external/contract.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

ITEMS = 501  # the small synthetic world's item IDs run 1..500; 0 pads


class BagTeacher(nn.Module):
    """A two-tower of the tensor form: a user is the mean of its history's item embeddings,
    an item its embedding; a score is their dot product plus the item's bias."""

    def __init__(self, items: int = ITEMS, dim: int = 8, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.embedding = nn.Parameter(torch.randn(items, dim, generator=generator) * 0.5)
        self.bias = nn.Parameter(torch.randn(items, generator=generator) * 0.1)

    def user_vector(self, history: torch.Tensor, history_length: torch.Tensor) -> torch.Tensor:
        slots = torch.arange(history.shape[1])
        real = (slots[None, :] < history_length[:, None]).float()
        summed = (self.embedding[history] * real[..., None]).sum(1)
        return summed / history_length.clamp(min=1)[:, None]

    def forward(self, history, history_length, candidates):
        user = self.user_vector(history, history_length)
        items = self.embedding[candidates]
        scores = (items @ user[:, :, None])[..., 0] + self.bias[candidates]
        return {"scores": scores, "user_vector": user, "item_vectors": items}


def build() -> BagTeacher:
    """The factory a ``[teachers.*] kind = "torch"`` table names."""
    return BagTeacher()


class RecordingBag(BagTeacher):
    """A :class:`BagTeacher` that keeps every tensor it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, np.ndarray]] = []

    def forward(self, user, moment, history, history_time, history_length, candidates):
        self.seen.append(
            {
                "user": user.numpy().copy(),
                "moment": moment.numpy().copy(),
                "history": history.numpy().copy(),
                "history_time": history_time.numpy().copy(),
                "history_length": history_length.numpy().copy(),
            }
        )
        return super().forward(history, history_length, candidates)


class RecordingModel:
    """A teacher of the Python contract (``score`` on lists with the user's own IDs) that
    keeps every list it is asked about."""

    def __init__(self, bag: BagTeacher | None = None) -> None:
        self.bag = bag or BagTeacher()
        self.params = sum(p.numel() for p in self.bag.parameters())  # optional: for the summary
        self.seen = []

    def _run(self, lists):
        self.seen.append(lists)
        history = torch.as_tensor(np.asarray(lists.history, dtype=np.int64))
        length = torch.as_tensor(lists.history_length)
        candidates = torch.as_tensor(np.asarray(lists.candidates, dtype=np.int64))
        with torch.no_grad():
            return {k: v.numpy() for k, v in self.bag(history, length, candidates).items()}

    def score(self, lists):
        return self._run(lists)["scores"]


class RecordingTwoTower(RecordingModel):
    """A :class:`RecordingModel` that gives its vectors too."""

    def vectors(self, lists):
        out = self._run(lists)
        return out["user_vector"], out["item_vectors"]


def write_weights(module: nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return path


def export_graph(
    module: nn.Module, path: Path, history_length: int, inputs: tuple[str, ...]
) -> Path:
    """``module`` as an ONNX graph of the tensor form reading ``inputs``."""
    example = {name: torch.ones((2,), dtype=torch.int64) for name in inputs}
    for name in ("history", "history_time"):
        example[name] = torch.ones((2, history_length), dtype=torch.int64)
    example["candidates"] = torch.ones((2, 3), dtype=torch.int64)
    example = {name: example[name] for name in inputs}
    lists, candidates = torch.export.Dim("lists"), torch.export.Dim("candidates")
    dynamic = {name: {0: lists} for name in inputs} | {"candidates": {0: lists, 1: candidates}}
    torch.onnx.export(
        module.eval(),
        (),
        str(path),
        kwargs=example,
        input_names=list(inputs),
        output_names=["scores", "user_vector", "item_vectors"],
        dynamic_shapes=dynamic,
        dynamo=True,
        verbose=False,
    )
    return path


def train_rows(data: Path) -> dict[int, list[tuple[int, int]]]:
    """Each user's interactions in the data's own order, (item, time): train, then the
    validation and test ones."""
    rows: dict[int, list[tuple[int, int]]] = {}
    for split in ("train", "valid", "test"):
        table = pq.read_table(
            data / f"{split}.parquet", columns=["user_id", "item_id", "timestamp"]
        )
        for user, item, time in zip(*(table.column(c).to_pylist() for c in table.column_names)):
            rows.setdefault(user, []).append((item, time))
    return rows


def write_vectors(path: Path, ids, times, vectors: np.ndarray, id_column: str) -> Path:
    table = pa.table(
        {
            id_column: pa.array(ids, pa.int64()),
            "valid_from": pa.array(times, pa.int64()),
            "vector": pa.array(list(vectors.astype(np.float32)), pa.list_(pa.float32())),
        }
    )
    pq.write_table(table, path)
    return path
