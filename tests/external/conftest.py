from pathlib import Path

import numpy as np
import pytest

from tests.external.teachers import BagTeacher, write_vectors

# A run that learns from a teacher called "outside": a student of each kind of loss (scores
# on its own lists, scores on the teacher-ranked lists, tower outputs) beside its twin.
STUDENT = """
[models.small]
embedding_dim = 4
tower = [8]
feature_dim = 2

[train]
history_length = 10
batch_size = 512
negatives = 4
epochs = 1
patience = 1
learning_rate = 5e-3

[baselines.ease]
l2 = [50.0]

[baselines.ease_recency]
half_life = [2.0]

[stages.student]
model = "small"
lists = { depth = 30, top = 8, uniform = 8 }
losses = [
    { fn = "softmax_ce" },
    { fn = "listnet", source = "outside", temperature = 2.0 },
    { fn = "listmle", source = "outside", top_k = 8 },
    { fn = "feature_mse", source = "outside", weight = 0.1 },
]

[stages.student_scratch]
model = "small"
losses = [{ fn = "softmax_ce" }]
"""

# The same run for a teacher that gives scores alone: no tower outputs to match.
SCORES_ONLY = STUDENT.replace('    { fn = "feature_mse", source = "outside", weight = 0.1 },\n', "")

# A log of scores brings its own lists: no teacher-ranked ones.
FROM_LOG = SCORES_ONLY.replace("lists = { depth = 30, top = 8, uniform = 8 }\n", "").replace(
    '    { fn = "listmle", source = "outside", top_k = 8 },\n', ""
)


def config_with(base: str, table: str) -> str:
    """``base`` with the ``[teachers.outside]`` table ``table`` (its body)."""
    return base + "\n[teachers.outside]\n" + table + "\n"


@pytest.fixture(scope="session")
def snapshots(synthetic_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A BagTeacher dumped as an embeddings teacher would be: every item's vector valid from
    the start, and each user's vector after each of its train interactions but every third,
    valid from the second after it."""
    import pyarrow.parquet as pq
    import torch

    directory = tmp_path_factory.mktemp("snapshots")
    bag = BagTeacher()
    table = pq.read_table(synthetic_dir / "train.parquet").to_pandas()
    items = np.arange(1, 501)
    with torch.no_grad():
        item_vectors = bag.embedding[torch.as_tensor(items)].numpy()
    users, times, vectors = [], [], []
    for user, rows in table.groupby("user_id", sort=True):
        history = rows["item_id"].to_numpy()
        for end in range(1, len(history) + 1, 3):
            users.append(user)
            times.append(int(rows["timestamp"].to_numpy()[end - 1]) + 1)
            vectors.append(item_vectors[history[:end] - 1].mean(0))
    return (
        write_vectors(
            directory / "items.parquet", items, np.zeros(len(items)), item_vectors, "item_id"
        ),
        write_vectors(directory / "users.parquet", users, times, np.stack(vectors), "user_id"),
    )


@pytest.fixture(scope="session")
def score_log(synthetic_dir, tmp_path_factory) -> Path:
    """A BagTeacher's scores as a production log holds them: a request at each train
    interaction (its item and 9 others), and one more per user a day after its validation
    interaction, which must never be learnt from."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    bag = BagTeacher()
    rng = np.random.default_rng(0)
    train = pq.read_table(synthetic_dir / "train.parquet").to_pandas()
    valid = pq.read_table(synthetic_dir / "valid.parquet").to_pandas()
    late = valid.assign(timestamp=valid["timestamp"] + 86_400)
    requests = pd.concat([train, late])[["user_id", "item_id", "timestamp"]]
    rows = {"user_id": [], "request_time": [], "item_id": [], "score": []}
    with torch.no_grad():
        for user, item, time in requests.itertuples(index=False):
            candidates = np.r_[item, rng.integers(1, 501, size=9)]
            scores = bag.bias[torch.as_tensor(candidates)].numpy() + rng.normal(size=10) * 0.01
            rows["user_id"] += [user] * 10
            rows["request_time"] += [time] * 10
            rows["item_id"] += candidates.tolist()
            rows["score"] += scores.astype(np.float32).tolist()
    path = tmp_path_factory.mktemp("log") / "scores.parquet"
    pq.write_table(pa.table(rows), path)
    return path
