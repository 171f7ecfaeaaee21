"""Any model that meets the contract teaches: lists with the user's own IDs go in, checked
answers come out, and the teacher is a model of the run beside the student it taught."""

import tomllib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import recdistill
from recdistill.config import parse_run_config
from recdistill.data.batches import CandidateLists, TrainLists
from recdistill.data.feature_store import FeatureStore
from recdistill.errors import TeacherError
from recdistill.evaluation_report import build_report
from recdistill.external.adapter import DataIds, contract_teacher
from recdistill.layout import RunLayout
from recdistill.segments import SliceSpec
from recdistill.summary import ExternalModel, read_summary
from tests.external.conftest import SCORES_ONLY, STUDENT, config_with
from tests.external.teachers import BagTeacher, RecordingTwoTower, write_weights


def test_lists_carry_the_user_s_own_ids_and_the_batch_s_contents(synthetic_dir):
    store = FeatureStore(synthetic_dir, history_length=10)
    batch = next(TrainLists(store, batch_size=64, negatives=3).epoch(0))
    lists = DataIds(store).lists(batch)
    assert lists.candidates.shape == (64, 4) and len(lists) == 64
    slots = batch.items["item_id"].values()[batch.candidates].numpy()
    assert (lists.candidates == store.items.values[slots - 1]).all()
    assert (lists.users == batch.user_ids.numpy()).all()
    assert (lists.moments == store.row_times(batch.train_rows.numpy())).all()
    lengths = batch.users["history"].lengths().numpy()
    assert (lists.history_length == lengths).all()
    first = lists.history[0, : lengths[0]]
    assert (
        first == store.items.values[batch.users["history"].values().numpy()[: lengths[0]] - 1]
    ).all()
    gender = store.user_features[0]
    codes = batch.users[gender].values().numpy()
    assert (lists.features[gender] == store.feature_vocabularies[gender].values[codes - 1]).all()


@pytest.fixture(scope="module")
def python_run(synthetic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("python") / "run"
    config = parse_run_config(tomllib.loads(config_with(STUDENT, 'kind = "python"')))
    recdistill.train(config, synthetic_dir, out, teachers={"outside": RecordingTwoTower()})
    return out


def test_a_teacher_from_outside_is_a_model_of_the_run(python_run):
    summary = read_summary(RunLayout(python_run).summary)
    outside = summary.models["outside"]
    assert isinstance(outside, ExternalModel) and outside.kind == "python"
    assert set(outside.metrics) >= {"ndcg@10", "hr@10", "mrr", "full_ndcg@10", "full_recall@10"}
    assert "two-tower, 8-d vectors" in outside.note
    assert {
        "student_vs_outside",
        "student_vs_student_scratch",
        "outside_vs_ease",
        "outside_vs_ease_recency",
        "outside_vs_popularity",
    } <= set(summary.comparisons)
    assert next(iter(summary.models)) == "outside"
    report = build_report(python_run, SliceSpec(min_users=20))
    segments = pd.read_parquet(report.parent / "segments.parquet")
    overall = segments[
        (segments["model"] == "student")
        & (segments["metric"] == "ndcg@10")
        & (segments["segment"] == "all")
    ]
    assert overall["retention"].notna().all()  # retention against the teacher from outside
    assert "of outside's ndcg@10" in report.read_text()


def test_a_torch_factory_and_an_object_of_the_same_weights_teach_alike(synthetic_dir, tmp_path):
    weights = write_weights(BagTeacher(seed=3), tmp_path / "bag.safetensors")
    table = f'kind = "torch"\nfactory = "tests.external.teachers:build"\nweights = "{weights}"'
    by_file = recdistill.train(
        parse_run_config(tomllib.loads(config_with(SCORES_ONLY, table))),
        synthetic_dir,
        tmp_path / "file",
    )
    by_object = recdistill.train(
        parse_run_config(tomllib.loads(config_with(SCORES_ONLY, 'kind = "torch"'))),
        synthetic_dir,
        tmp_path / "object",
        teachers={"outside": BagTeacher(seed=3)},
    )
    assert by_file.models["outside"].metrics == by_object.models["outside"].metrics
    assert by_file.models["student"].metrics == by_object.models["student"].metrics
    assert by_file.models["outside"].params == 501 * 8 + 501


class Inconsistent(RecordingTwoTower):
    def score(self, lists):
        return super().score(lists) * 2.0


def test_a_teacher_whose_scores_are_not_its_vectors_is_refused(synthetic_dir):
    store = FeatureStore(synthetic_dir, history_length=10)
    with pytest.raises(TeacherError, match="its scores are not its user vector · item vector plus"):
        contract_teacher("outside", Inconsistent(), store)


def test_a_teacher_that_gives_scores_alone_ranks_the_catalogue_it_is_asked_about(synthetic_dir):
    store = FeatureStore(synthetic_dir, history_length=10)
    bag = BagTeacher()

    class ScoresOnly:
        def score(self, lists):
            with torch.no_grad():
                out = bag(
                    torch.as_tensor(lists.history.astype(np.int64)),
                    torch.as_tensor(lists.history_length),
                    torch.as_tensor(lists.candidates.astype(np.int64)),
                )
            return out["scores"].numpy()

    scorer = contract_teacher("outside", ScoresOnly(), store)
    two_tower = contract_teacher("outside", RecordingTwoTower(bag), store)
    batch = next(iter(CandidateLists(store, "valid", batch_size=16)))
    assert torch.allclose(scorer(batch), two_tower(batch), atol=1e-5)
    ranked = scorer.ranked(20)
    assert (ranked == two_tower.ranked(20)).mean() > 0.99  # equal up to float ties


def test_string_ids_reach_a_python_teacher_and_a_torch_one_through_its_vocabulary(tmp_path):
    rng = np.random.default_rng(0)
    visitors = rng.integers(0, 40, size=2000)
    events = pd.DataFrame(
        {
            "visitor": [f"v{v}" for v in visitors],
            "sku": [f"sku-{(v * 7 + rng.integers(0, 20)) % 120}" for v in visitors],
            "ts": 1_700_000_000 + np.arange(2000) * 60,
        }
    )
    data = recdistill.prepare_data(
        events, tmp_path / "data", user="visitor", item="sku", time="ts", log=lambda _: None
    )
    store = FeatureStore(data, history_length=10)
    skus = store.item_ids.named(store.items.values)

    class ByName:
        def score(self, lists):
            assert isinstance(lists.users[0], str) and lists.users[0].startswith("v")
            assert str(lists.candidates[0, 0]).startswith("sku-")
            return np.vectorize(lambda sku: float(int(sku[4:]) % 7))(lists.candidates).astype(
                np.float32
            )

    config = config_with(SCORES_ONLY, 'kind = "python"').replace("negatives = 4", "negatives = 3")
    run = recdistill.train(
        parse_run_config(tomllib.loads(config)),
        data,
        tmp_path / "python",
        teachers={"outside": ByName()},
    )
    assert "ndcg@10" in run.models["outside"].metrics

    vocabulary = tmp_path / "items.parquet"
    order = sorted(skus, key=lambda sku: -int(sku[4:]))  # the teacher's own index order
    pq.write_table(pa.table({"id": [None, *order]}), vocabulary)
    bag = BagTeacher(items=len(order) + 1)
    with_vocabulary = config_with(
        SCORES_ONLY, f'kind = "torch"\nvocabulary = {{ item_id = "{vocabulary}" }}'
    )
    with_vocabulary = with_vocabulary.replace("negatives = 4", "negatives = 3")
    run = recdistill.train(
        parse_run_config(tomllib.loads(with_vocabulary)),
        data,
        tmp_path / "torch",
        teachers={"outside": bag},
    )
    assert "ndcg@10" in run.models["outside"].metrics
    without = config_with(SCORES_ONLY, 'kind = "torch"').replace("negatives = 4", "negatives = 3")
    with pytest.raises(
        TeacherError, match="the IDs are strings and the teacher declares no vocabulary"
    ):
        recdistill.train(
            parse_run_config(tomllib.loads(without)),
            data,
            tmp_path / "none",
            teachers={"outside": bag},
        )


def test_an_ensemble_may_mix_a_teacher_from_outside_with_a_baseline(synthetic_dir, tmp_path):
    mix = """
[ensembles.mix]
members = ["outside", "ease_recency"]
weights = [[0.9, 0.1], [0.5, 0.5]]
"""
    config = config_with(
        SCORES_ONLY.replace('source = "outside"', 'source = "mix"'), 'kind = "python"'
    )
    summary = recdistill.train(
        parse_run_config(tomllib.loads(config + mix)),
        synthetic_dir,
        tmp_path / "run",
        teachers={"outside": RecordingTwoTower()},
    )
    assert set(summary.models["mix"].weights) == {"outside", "ease_recency"}
    assert summary.models["mix"].params == 501 * 8 + 501 + 501**2
    assert {"mix_vs_outside", "mix_vs_ease_recency", "student_vs_mix"} <= set(summary.comparisons)
