"""Time runs one way for teachers from outside too: whatever a teacher is shown of a list's
user is what came before the list's moment, for every kind, on a real split."""

import tomllib

import numpy as np

import recdistill
from recdistill.config import parse_run_config
from recdistill.data.batches import TrainLists
from recdistill.data.feature_store import FeatureStore
from recdistill.external.adapter import DataIds, contract_teacher
from recdistill.external.embeddings import Snapshots
from recdistill.external.logged import LoggedScores
from recdistill.external.onnx_graph import OnnxRunner
from tests.external.conftest import FROM_LOG, SCORES_ONLY, STUDENT, config_with
from tests.external.teachers import (
    BagTeacher,
    RecordingBag,
    RecordingModel,
    RecordingTwoTower,
    export_graph,
    train_rows,
)

CAP = 10  # the runs' history_length


def assert_before(rows_of, users, moments, history, lengths, times) -> int:
    """Each list's history is exactly its user's interactions before its moment, newest
    first, capped, with their true times (the small world has no two interactions of a user
    in one second, so "before" is "at an earlier time"); returns how many lists there were."""
    for user, moment, items, length, stamps in zip(users, moments, history, lengths, times):
        earlier = [(item, time) for item, time in rows_of[int(user)] if time < moment]
        expected = list(reversed(earlier))[:CAP]
        shown = [(int(items[k]), int(stamps[k])) for k in range(int(length))]
        assert shown == expected, (int(user), int(moment))
    return len(users)


def train(config: str, data, out, **teachers):
    return recdistill.train(parse_run_config(tomllib.loads(config)), data, out, teachers=teachers)


def test_a_python_teacher_sees_only_the_past_of_every_list(synthetic_dir, tmp_path):
    model = RecordingTwoTower()
    train(config_with(STUDENT, 'kind = "python"'), synthetic_dir, tmp_path / "run", outside=model)
    rows_of = train_rows(synthetic_dir)
    shown = sum(
        assert_before(
            rows_of,
            lists.users,
            lists.moments,
            lists.history,
            lists.history_length,
            lists.history_times,
        )
        for lists in model.seen
    )
    assert shown > 9000  # every train row's state, validation, test and full-ranking lists


def test_a_torch_teacher_sees_only_the_past_of_every_list(synthetic_dir, tmp_path):
    module = RecordingBag()
    train(config_with(STUDENT, 'kind = "torch"'), synthetic_dir, tmp_path / "run", outside=module)
    rows_of = train_rows(synthetic_dir)
    shown = sum(
        assert_before(
            rows_of,
            seen["user"],
            seen["moment"],
            seen["history"],
            seen["history_length"],
            seen["history_time"],
        )
        for seen in module.seen
    )
    assert shown > 9000


class TimedBag(BagTeacher):
    """A BagTeacher whose graph reads the user, the moment and the history's times too."""

    def forward(self, user, moment, history, history_time, history_length, candidates):
        out = super().forward(history, history_length, candidates)
        unused = (user + moment + history_time.sum(1)).float()[:, None] * 0.0
        return {**out, "scores": out["scores"] + unused}


def test_an_onnx_teacher_is_fed_only_the_past_of_every_list(synthetic_dir, tmp_path, monkeypatch):
    names = ("user", "moment", "history", "history_time", "history_length", "candidates")
    graph = export_graph(TimedBag(), tmp_path / "timed.onnx", CAP, names)
    fed = []
    run = OnnxRunner.__call__

    def recording(self, feed):
        fed.append({name: value.copy() for name, value in feed.items()})
        return run(self, feed)

    monkeypatch.setattr(OnnxRunner, "__call__", recording)
    table = f'kind = "onnx"\npath = "{graph}"'
    train(config_with(SCORES_ONLY, table), synthetic_dir, tmp_path / "run")
    rows_of = train_rows(synthetic_dir)
    shown = sum(
        assert_before(
            rows_of,
            feed["user"],
            feed["moment"],
            feed["history"],
            feed["history_length"],
            feed["history_time"],
        )
        for feed in fed
    )
    assert shown > 9000


def test_an_embeddings_teacher_reads_no_snapshot_from_at_or_after_a_list(
    synthetic_dir, snapshots, tmp_path, monkeypatch
):
    items, users = snapshots
    looked_up = []
    rows = Snapshots.rows

    def recording(self, owners, moments):
        found = rows(self, owners, moments)
        looked_up.append((self, *np.broadcast_arrays(owners, moments), found))
        return found

    monkeypatch.setattr(Snapshots, "rows", recording)
    table = f'kind = "embeddings"\nitems = "{items}"\nusers = "{users}"'
    train(config_with(STUDENT, table), synthetic_dir, tmp_path / "run")
    assert looked_up
    for table, owners, moments, found in looked_up:
        used = found >= 0
        assert (table.times[found[used]] < moments[used]).all()
        assert (table.owners[found[used]] == owners[used]).all()
        # and it is the newest such snapshot: the row after it is another owner's or too late
        after = np.minimum(found[used] + 1, len(table.times) - 1)
        newest = (table.owners[after] != owners[used]) | (table.times[after] >= moments[used])
        newest |= found[used] + 1 == len(table.times)
        assert newest.all()


def test_a_score_log_teaches_from_requests_before_the_held_out_items_only(
    synthetic_dir, score_log, tmp_path, monkeypatch
):
    made = []
    lists = LoggedScores._lists

    def recording(self, requests):
        answer = lists(self, requests)
        made.append((self, answer))
        return answer

    monkeypatch.setattr(LoggedScores, "_lists", recording)
    table = f'kind = "scores"\npath = "{score_log}"'
    train(config_with(FROM_LOG, table), synthetic_dir, tmp_path / "run")
    rows_of = train_rows(synthetic_dir)
    store = FeatureStore(synthetic_dir, history_length=CAP)
    ids = DataIds(store)
    teacher = made[0][0]
    assert teacher.dropped == store.users.values.size  # each user's late request
    shown = 0
    for _, answer in made:
        lists_ = ids.lists(answer.batch)
        user_index = store.users.index(lists_.users)
        assert (lists_.moments < store.valid_times[user_index]).all()
        shown += assert_before(
            rows_of,
            lists_.users,
            lists_.moments,
            lists_.history,
            lists_.history_length,
            lists_.history_times,
        )
    assert shown > 8000


def test_on_movielens_a_list_s_history_is_every_interaction_before_its_row(ml100k_dir):
    """MovieLens users rate many films in one second: "before" is the split's order, whose
    ties are broken by a seeded key, and a teacher sees exactly what the student sees."""
    import pyarrow.parquet as pq

    store = FeatureStore(ml100k_dir, history_length=50)
    model = RecordingModel(BagTeacher(items=1683))
    teacher = contract_teacher("outside", model, store)
    batch = next(TrainLists(store, batch_size=256, negatives=3).epoch(0))
    teacher.outputs(batch)
    lists = model.seen[-1]
    train = pq.read_table(ml100k_dir / "train.parquet").to_pandas()
    offsets = np.r_[0, np.cumsum(train.groupby("user_id", sort=True).size().to_numpy())]
    for row, user, moment, items, stamps, length in zip(
        batch.train_rows.numpy(),
        lists.users,
        lists.moments,
        lists.history,
        lists.history_times,
        lists.history_length,
    ):
        owner = np.searchsorted(offsets, row, side="right") - 1
        assert train["user_id"].iat[row] == user and train["timestamp"].iat[row] == moment
        before = train.iloc[max(offsets[owner], row - 50) : row][::-1]
        assert list(items[:length]) == before["item_id"].tolist()
        assert list(stamps[:length]) == before["timestamp"].tolist()
        assert (stamps[:length] <= moment).all()
    assert (lists.history_times == lists.moments[:, None]).any(), "no tie was shown: a weak test"
