"""A SASRec teacher trained outside recdistill, then handed over the ways a team can.

Plain PyTorch, pandas and pyarrow, nothing of recdistill's: the kind of model a team already
has. It reads the data directory recdistill prepared (only its documented Parquet tables:
train.parquet, candidates_valid.parquet, items.parquet, users.parquet), trains a SASRec on
the train split (causal self-attention over the 50 newest items and the user's own
embedding, every next item scored against the whole catalogue), keeps its best epoch on
validation NDCG@10, and writes into --out:

- weights.safetensors and vocabulary/item_id.parquet, vocabulary/user_id.parquet (its own
  indices: items most popular first, users by ID);
- teacher.onnx: the model as an ONNX graph of recdistill's tensor form (user, history,
  history_length, candidates -> scores, user_vector, item_vectors);
- embeddings/items.parquet and embeddings/users.parquet: its item vectors, and each user's
  vector as a daily dump would hold it (one snapshot per day the user was active, valid from
  the midnight after);
- scores.parquet: its scores as a production log holds them: at each train interaction a
  request with 100 candidates (the item the user took, 49 of the teacher's top items and
  50 others the user had not had).

    python examples/sasrec_teacher/sasrec.py --data data/ml100k --out runs/sasrec_teacher

The configs beside this file distil each form into the ml-100k student
(docs/external-teachers.md).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

MAX_LENGTH = 50
DAY = 86_400


class SASRec(nn.Module):
    """SASRec (Kang & McAuley, 2018) with a user embedding and MLP heads, read as
    recdistill's tensor form.

    Histories come newest first (index 0 the newest item): position ``j`` attends to itself
    and to older items, so its state is the user as of just after item ``j``. A user vector
    is an MLP of a position's state and the user's own embedding (position 0's: the user as
    of the list's moment); an item vector an MLP of the item's embedding. Index 0 pads.
    """

    def __init__(
        self,
        items: int,
        users: int,
        dim: int = 128,
        layers: int = 2,
        heads: int = 2,
        dropout: float = 0.3,
        hidden: int = 1024,
    ):
        super().__init__()
        self.item = nn.Embedding(items, dim, padding_idx=0)
        self.history = nn.Embedding(items, dim, padding_idx=0)
        self.user = nn.Embedding(users, dim)
        self.position = nn.Embedding(MAX_LENGTH, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.user_head = nn.Sequential(
            nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )
        self.item_head = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )
        self.bias = nn.Parameter(torch.zeros(items))
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.item.weight, std=0.05)
        nn.init.normal_(self.history.weight, std=0.05)
        nn.init.normal_(self.user.weight, std=0.05)

    def states(
        self, user: torch.Tensor, history: torch.Tensor, history_length: torch.Tensor
    ) -> torch.Tensor:
        """The user vector at every position ``[B, L, D]``."""
        history = history[:, :MAX_LENGTH]
        slots = torch.arange(history.shape[1])
        length = history_length.clamp(max=history.shape[1])
        real = slots[None, :] < length[:, None]
        age = (length[:, None] - 1 - slots[None, :]).clamp(min=0)
        x = self.dropout(self.history(history * real) + self.position(age)) * real[..., None]
        allowed = (slots[None, :] >= slots[:, None])[None] & real[:, None, :]
        allowed = allowed | (slots[:, None] == slots[None, :])[None]
        for block in self.blocks:
            x = block(x, allowed)
        x = self.norm(x) * real[..., None]
        who = self.user(user)[:, None, :].expand(-1, x.shape[1], -1)
        return self.user_head(torch.cat([x, who], dim=2))

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        return self.item_head(self.item(items))

    def forward(self, user, history, history_length, candidates):
        vector = self.states(user, history, history_length)[:, 0]
        items = self.item_vectors(candidates)
        scores = (items @ vector[:, :, None])[..., 0] + self.bias[candidates]
        return {"scores": scores, "user_vector": vector, "item_vectors": items}


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.feed = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (t.reshape(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        weights = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        weights = weights.masked_fill(~allowed[:, None], -torch.inf).softmax(-1)
        attended = (self.dropout(weights) @ v).transpose(1, 2).reshape(batch, length, dim)
        x = x + self.dropout(self.out(attended))
        return x + self.dropout(self.feed(self.norm2(x)))


def read_log(data: Path) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The train split (sorted by user, then time, as recdistill writes it) with each item and
    user as an index of the teacher's own vocabularies (items most popular first, users by ID;
    0 pads), and those vocabularies in index order (from 1)."""
    train = pq.read_table(data / "train.parquet", columns=["user_id", "item_id", "timestamp"])
    train = train.to_pandas()
    catalogue = pq.read_table(data / "items.parquet", columns=["item_id"]).column(0).to_numpy()
    counts = train["item_id"].value_counts()
    items = np.array(sorted(catalogue, key=lambda item: (-counts.get(item, 0), item)))
    users = np.sort(pq.read_table(data / "users.parquet", columns=["user_id"]).column(0).to_numpy())
    train["item"] = train["item_id"].map({item: k + 1 for k, item in enumerate(items)})
    train["user"] = train["user_id"].map({user: k + 1 for k, user in enumerate(users)})
    return train, items, users


def windows(train: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Next-item windows: users ``[W]``, histories ``[W, L]`` (newest first) and the item
    after each position ``[W, L]`` (0 where none): every train interaction but a user's
    first is a target."""
    users, histories, targets = [], [], []
    for user, rows in train.groupby("user", sort=False):
        sequence = rows["item"].to_numpy()
        for end in range(len(sequence), 1, -MAX_LENGTH):
            start = max(0, end - 1 - MAX_LENGTH)
            history = sequence[start : end - 1][::-1]
            after = sequence[start + 1 : end][::-1]
            users.append(user)
            histories.append(np.pad(history, (0, MAX_LENGTH - len(history))))
            targets.append(np.pad(after, (0, MAX_LENGTH - len(after))))
    return np.array(users), np.stack(histories), np.stack(targets)


def history_before(sequence: np.ndarray, end: int) -> tuple[np.ndarray, int]:
    """The items before position ``end`` of a user's sequence, newest first, padded."""
    history = sequence[max(0, end - MAX_LENGTH) : end][::-1]
    return np.pad(history, (0, MAX_LENGTH - len(history))), len(history)


@torch.no_grad()
def user_vectors(model: SASRec, users, histories, lengths) -> torch.Tensor:
    """The user vectors of lists, 1,024 at a time."""
    users, histories, lengths = (torch.as_tensor(np.array(a)) for a in (users, histories, lengths))
    return torch.cat(
        [
            model.states(users[k : k + 1024], histories[k : k + 1024], lengths[k : k + 1024])[:, 0]
            for k in range(0, len(users), 1024)
        ]
    )


@torch.no_grad()
def valid_ndcg(model: SASRec, data: Path, train: pd.DataFrame, items: np.ndarray) -> float:
    """NDCG@10 on the validation candidate lists (the held-out item first)."""
    model.eval()
    lists = pq.read_table(data / "candidates_valid.parquet").to_pandas()
    sequences = {user: rows for user, rows in train.groupby("user_id")}
    index = {item: k + 1 for k, item in enumerate(items)}
    histories, lengths = zip(
        *(
            history_before(sequences[u]["item"].to_numpy(), len(sequences[u]))
            for u in lists["user_id"]
        )
    )
    users = [sequences[u]["user"].iat[0] for u in lists["user_id"]]
    vectors = user_vectors(model, users, np.stack(histories), lengths)
    candidates = torch.as_tensor(np.stack([[index[i] for i in row] for row in lists["candidates"]]))
    scores = (model.item_vectors(candidates) @ vectors[:, :, None])[..., 0] + model.bias[candidates]
    rank = (scores[:, 1:] > scores[:, :1]).sum(1)
    model.train()
    return float(torch.where(rank < 10, 1 / torch.log2(rank + 2.0), 0.0).mean())


def train_teacher(data: Path, epochs: int, seed: int):
    """The model at its best validation epoch, the train log and the two vocabularies."""
    torch.manual_seed(seed)
    train, items, users = read_log(data)
    owners, histories, targets = (torch.as_tensor(a) for a in windows(train))
    model = SASRec(len(items) + 1, len(users) + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-5)
    catalogue = torch.arange(len(items) + 1)
    best, best_state = -1.0, None
    for epoch in range(epochs):
        started, total = time.time(), 0.0
        for batch in torch.randperm(len(histories)).split(64):
            history, target = histories[batch], targets[batch]
            states = model.states(owners[batch], history, (history > 0).sum(1))
            logits = states @ model.item_vectors(catalogue).T + model.bias
            loss = F.cross_entropy(logits[target > 0], target[target > 0])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() / len(histories) * len(batch)
        ndcg = valid_ndcg(model, data, train, items)
        if ndcg > best:
            best, best_state = ndcg, {k: v.clone() for k, v in model.state_dict().items()}
        took = time.time() - started
        print(
            f"epoch {epoch}: loss {total:.3f}  valid ndcg@10 {ndcg:.4f}  ({took:.0f} s)", flush=True
        )
    model.load_state_dict(best_state)
    print(f"kept the best epoch: valid ndcg@10 {best:.4f}")
    return model.eval(), train, items, users


def export_onnx(model: SASRec, path: Path) -> None:
    """The model as an ONNX graph of recdistill's tensor form, the batch and the candidates
    free dimensions."""
    example = {
        "user": torch.tensor([1, 0]),
        "history": torch.ones((2, MAX_LENGTH), dtype=torch.int64),
        "history_length": torch.tensor([MAX_LENGTH, 0]),
        "candidates": torch.ones((2, 3), dtype=torch.int64),
    }
    lists, candidates = torch.export.Dim("lists"), torch.export.Dim("candidates")
    dynamic = {name: {0: lists} for name in example} | {"candidates": {0: lists, 1: candidates}}
    torch.onnx.export(
        model,
        (),
        str(path),
        kwargs=example,
        input_names=list(example),
        output_names=["scores", "user_vector", "item_vectors"],
        dynamic_shapes=dynamic,
        dynamo=True,
    )


def dump_embeddings(
    model: SASRec, data: Path, items: np.ndarray, users: np.ndarray, out: Path
) -> None:
    """Item vectors, valid from the start; each user's vector after each active day, valid
    from the midnight after it (its whole log: train, validation and test interactions)."""
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        vectors = model.item_vectors(torch.arange(1, len(items) + 1)).numpy()
    pq.write_table(
        pa.table(
            {
                "item_id": items,
                "valid_from": np.zeros(len(items), np.int64),
                "vector": list(vectors),
            }
        ),
        out / "items.parquet",
    )
    columns = ["user_id", "item_id", "timestamp"]
    log = pd.concat(
        pq.read_table(data / f"{s}.parquet", columns=columns).to_pandas()
        for s in ("train", "valid", "test")
    )
    item_index = {item: k + 1 for k, item in enumerate(items)}
    user_index = {user: k + 1 for k, user in enumerate(users)}
    owners, moments, histories, lengths = [], [], [], []
    for user, rows in log.groupby("user_id", sort=True):
        sequence = rows["item_id"].map(item_index).to_numpy()
        days = rows["timestamp"].to_numpy() // DAY
        for end in np.flatnonzero(np.r_[days[1:] != days[:-1], True]) + 1:
            history, length = history_before(sequence, end)
            owners.append(user)
            moments.append((days[end - 1] + 1) * DAY)
            histories.append(history)
            lengths.append(length)
    vectors = user_vectors(model, [user_index[u] for u in owners], np.stack(histories), lengths)
    pq.write_table(
        pa.table({"user_id": owners, "valid_from": moments, "vector": list(vectors.numpy())}),
        out / "users.parquet",
    )


@torch.no_grad()
def log_scores(model: SASRec, train: pd.DataFrame, items: np.ndarray, out: Path, seed: int) -> None:
    """A request at each train interaction, scored from the history before its second."""
    rng = np.random.default_rng(seed)
    catalogue = model.item_vectors(torch.arange(len(items) + 1))
    columns = {"user_id": [], "request_time": [], "item_id": [], "score": []}
    for user, rows in train.groupby("user_id", sort=True):
        sequence, times = rows["item"].to_numpy(), rows["timestamp"].to_numpy()
        before = np.searchsorted(times, times, side="left")  # interactions strictly earlier
        histories, lengths = zip(*(history_before(sequence, end) for end in before))
        vectors = user_vectors(model, rows["user"].to_numpy(), np.stack(histories), lengths)
        scores = vectors @ catalogue.T + model.bias
        scores[:, 0] = -torch.inf
        seen = np.zeros(len(items) + 1, dtype=bool)
        seen[sequence] = True
        for row, taken in enumerate(sequence):
            ranked = scores[row].clone()
            ranked[torch.as_tensor(sequence[: before[row]])] = -torch.inf
            ranked[taken] = -torch.inf
            top = ranked.topk(49).indices.numpy()
            pool = ~seen
            pool[top] = pool[0] = False
            others = rng.choice(np.flatnonzero(pool), size=50, replace=False)
            candidates = np.r_[taken, top, others]
            columns["user_id"] += [user] * len(candidates)
            columns["request_time"] += [int(times[row])] * len(candidates)
            columns["item_id"] += items[candidates - 1].tolist()
            columns["score"] += scores[row, torch.as_tensor(candidates)].tolist()
    pq.write_table(pa.table({**columns, "score": pa.array(columns["score"], pa.float32())}), out)


def write_vocabulary(ids: np.ndarray, path: Path) -> None:
    """Its index order as recdistill reads a vocabulary: row k the ID of index k, 0 none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": pa.array([None, *ids.tolist()], pa.int64())}), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, required=True, help="a data directory of `recdistill data`"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="the folder to write the teacher into"
    )
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model, train, items, users = train_teacher(args.data, args.epochs, args.seed)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(args.out / "weights.safetensors"))
    write_vocabulary(items, args.out / "vocabulary" / "item_id.parquet")
    write_vocabulary(users, args.out / "vocabulary" / "user_id.parquet")
    export_onnx(model, args.out / "teacher.onnx")
    dump_embeddings(model, args.data, items, users, args.out / "embeddings")
    log_scores(model, train, items, args.out / "scores.parquet", args.seed)
    print(f"wrote the teacher's forms to {args.out}")


if __name__ == "__main__":
    main()
