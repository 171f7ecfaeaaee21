import numpy as np
import pytest
import torch

from recdistill import teachers
from recdistill.data.batches import FeatureStore, TrainLists
from recdistill.models import TwoTowerSpec
from recdistill.teachers import FrozenTeacher
from tests.test_trainer import fresh_model

HISTORY = 12


@pytest.fixture(scope="module")
def store(synthetic_dir):
    return FeatureStore(synthetic_dir, history_length=HISTORY)


def sequence_model(store, readout="last", seed=0):
    spec = TwoTowerSpec(
        embedding_dim=8,
        tower=(16, 8),
        feature_dim=2,
        dropout=0.3,
        user_encoder="sequence",
        max_length=6,  # fewer than the history holds: long pasts fill windows of their own
        layers=2,
        heads=2,
        readout=readout,
    )
    return fresh_model(store, seed=seed, spec=spec)


def from_the_lists_past_alone(model, store, rows):
    """The teacher's user vector of each row, computed from the row's own features."""
    model.eval()
    with torch.no_grad():
        return torch.cat(
            [
                model.user_tower(store.training_users(rows[i : i + 997]))
                for i in range(0, len(rows), 997)
            ]
        )


@pytest.mark.parametrize("readout", ["last", "attention"])
def test_a_sequence_teachers_state_for_a_list_is_its_user_vector_from_the_lists_past(
    store, readout, tmp_path
):
    model = sequence_model(store, readout)
    teacher = FrozenTeacher("teacher", model, store, cache=tmp_path)
    rows = np.arange(store.train_rows)
    before = rows - store.history.offsets[store.row_users(rows)]
    # every kind of row: an empty past, pasts shorter than the window, longer ones
    assert {0, 3, 6, 7, 20} <= set(before.tolist())
    torch.testing.assert_close(
        torch.as_tensor(np.array(teacher.states)),
        from_the_lists_past_alone(model, store, rows),
        atol=1e-5,
        rtol=0,
    )
    batch = next(TrainLists(store, batch_size=128, negatives=3, seed=4).epoch(0))
    users, _, scores, _ = teacher.outputs(batch)
    torch.testing.assert_close(users, model.user_tower(batch.users), atol=1e-5, rtol=0)
    torch.testing.assert_close(scores, model(batch), atol=1e-5, rtol=1e-5)


def test_a_bag_teacher_answers_from_each_lists_features(store):
    model = fresh_model(store, seed=3)
    teacher = FrozenTeacher("teacher", model, store)
    assert teacher.states is None
    batch = next(TrainLists(store, batch_size=64, negatives=3, seed=4).epoch(0))
    users, _, scores, _ = teacher.outputs(batch)
    model.eval()
    with torch.no_grad():
        assert torch.equal(users, model.user_tower(batch.users))
        assert torch.equal(scores, model(batch))
    # two lists of one user at different moments get different answers
    user = 5
    rows = store.history.offsets[user] + np.array([2, 9])
    users = teacher.outputs(store.training_batch(rows, np.ones((2, 1), dtype=np.int64))).users
    assert not torch.equal(users[0], users[1])


def test_states_are_computed_once_per_teacher_and_data(store, tmp_path, monkeypatch):
    model = sequence_model(store)
    FrozenTeacher("teacher", model, store, cache=tmp_path)
    written = list(tmp_path.glob("train_states_teacher_*.npy"))
    assert len(written) == 1

    def must_not_recompute(*args, **kwargs):
        raise AssertionError("the states were computed again")

    monkeypatch.setattr(teachers, "sequence_states", must_not_recompute)
    again = FrozenTeacher("teacher", model, store, cache=tmp_path)
    assert again.states.shape == (store.train_rows, model.output_dim)
    monkeypatch.undo()
    FrozenTeacher("teacher", sequence_model(store, seed=1), store, cache=tmp_path)
    assert len(list(tmp_path.glob("train_states_teacher_*.npy"))) == 2
    assert not list(tmp_path.glob("*.partial"))
