"""What each way in does with what it is handed: embedding snapshots and logs of scores."""

import tomllib

import numpy as np
import pytest
import torch

import recdistill
from recdistill.config import parse_run_config
from recdistill.data.batches import CandidateLists
from recdistill.data.feature_store import FeatureStore
from recdistill.external.embeddings import EmbeddingTeacher
from recdistill.external.logged import LoggedScores
from recdistill.external.spec import TeacherSpec
from tests.external.conftest import FROM_LOG, config_with
from tests.external.teachers import BagTeacher


@pytest.fixture(scope="module")
def store(synthetic_dir):
    return FeatureStore(synthetic_dir, history_length=10)


@pytest.mark.parametrize("missing", ["history", "skip"])
def test_a_list_without_a_snapshot_reads_its_history_or_is_left_out(store, snapshots, missing):
    items, users = snapshots
    spec = TeacherSpec("outside", "embeddings", items=str(items), users=str(users), missing=missing)
    teacher = EmbeddingTeacher("outside", spec, store, None)
    # Each user's first train row comes before its first snapshot (valid a second after it).
    first_rows = store.history.offsets[1:-1][:50]
    batch = store.training_batch(first_rows, np.ones((50, 3), dtype=np.int64))
    answer = teacher.outputs(batch)
    bag = BagTeacher()
    history = batch.users["history"]
    assert (history.lengths() == 0).all()  # nothing before a user's first row
    assert torch.allclose(answer.users, torch.zeros_like(answer.users))
    if missing == "skip":
        assert answer.valid is not None and not answer.valid.any()
    else:
        assert answer.valid is None
    later = store.training_batch(first_rows + 5, np.ones((50, 3), dtype=np.int64))
    answer = teacher.outputs(later)
    assert answer.valid is None or answer.valid.all()
    # the snapshot read is the newest before row 5: the one written after the first 4 rows
    past, lengths = store.past(first_rows + 5)
    expected = bag.embedding.detach()[torch.as_tensor(store.items.values[past[1:5] - 1])].mean(0)
    assert torch.allclose(answer.users[0], expected, atol=1e-6)
    assert int(lengths[0]) == 5
    # every evaluation list is scored, and the catalogue agrees with the candidates
    evaluation = next(iter(CandidateLists(store, "test", batch_size=32)))
    scores = teacher(evaluation)
    assert torch.isfinite(scores).all()
    catalogue = teacher.catalogue_scores(evaluation)
    slots = evaluation.items["item_id"].values()[evaluation.candidates]
    assert torch.allclose(catalogue.gather(1, slots), scores, atol=1e-5)


def test_an_epoch_deals_out_every_kept_request_of_a_log(store, score_log):
    teacher = LoggedScores("outside", TeacherSpec("outside", "scores", path=str(score_log)), store)
    assert teacher.requests + teacher.dropped == store.train_rows + len(store.users.values)
    batches = 7
    dealt = np.concatenate(
        [teacher.own_lists(3, k, batches).batch.moments.numpy() for k in range(batches)]
    )
    assert len(dealt) >= teacher.requests
    assert sorted(set(dealt.tolist())) == sorted(set(teacher.moments.tolist()))
    lists = teacher.own_lists(0, 0, batches)
    assert not lists.shares_users and lists.targets.shape == lists.batch.mask.shape
    assert int(lists.batch.mask.sum(1).max()) == 10


def test_a_run_taught_by_a_log_names_it_without_test_metrics(synthetic_dir, score_log, tmp_path):
    config = parse_run_config(
        tomllib.loads(config_with(FROM_LOG, f'kind = "scores"\npath = "{score_log}"'))
    )
    summary = recdistill.train(config, synthetic_dir, tmp_path / "run")
    entry = summary.models["outside"]
    assert entry.kind == "scores" and entry.metrics == {} and entry.latency_ms is None
    assert "logged requests kept" in entry.note
    assert "student_vs_student_scratch" in summary.comparisons
    assert "student_vs_outside" not in summary.comparisons
    recdistill.report(tmp_path / "run", min_users=20)
