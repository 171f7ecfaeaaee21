import itertools
import math

import numpy as np
import pytest
import torch

from recdistill.config import parse_run_config
from recdistill.data.batches import FeatureStore, TrainLists
from recdistill.losses import listmle_loss
from recdistill.ranked_lists import ListSpec, rrd_lists
from recdistill.stage import LossTerm
from recdistill.teachers import FrozenTeacher
from recdistill.trainer import Trainer
from tests.test_trainer import fresh_model, log_of, stage


@pytest.fixture(scope="module")
def store(synthetic_dir):
    return FeatureStore(synthetic_dir, history_length=10)


@pytest.fixture(scope="module")
def teacher(store):
    return FrozenTeacher("teacher", fresh_model(store, seed=7), store)


def training_batch(store, size=64, seed=3):
    return next(TrainLists(store, batch_size=size, negatives=4, seed=seed).epoch(0))


def past_of(store, row):
    values, _lengths = store.past(np.array([row]))
    return set(values.tolist())


def seen_by(store, user):
    offsets = store.history.offsets
    return set(store.history.values[offsets[user] : offsets[user + 1]].tolist())


def list_items(lists):
    return lists.items["item_id"].values().numpy()[lists.candidates.numpy()]


def test_rrd_lists_hold_the_teachers_top_unseen_items_in_its_order_then_uniform_others(
    store, teacher
):
    spec = ListSpec(depth=30, top=8, temperature=5.0, uniform=20)
    batch = training_batch(store)
    users = teacher.users(batch)
    lists, target, _ = rrd_lists(batch, users, teacher, store, spec, np.random.default_rng(0))
    assert lists.list_size == 28
    assert torch.equal(lists.users.values(), batch.users.values())  # the list's own moment
    items, mask = list_items(lists), lists.mask.numpy()
    scores = (users @ teacher.items.T + teacher.bias).numpy()
    np.testing.assert_allclose(target.numpy(), np.take_along_axis(scores, items, 1), rtol=1e-6)
    for row, (train_row, listed, valid) in enumerate(zip(batch.train_rows.tolist(), items, mask)):
        row_user = int(store.row_users(np.array([train_row]))[0])
        excluded = past_of(store, train_row) | {int(store.row_items(np.array([train_row]))[0]), 0}
        allowed = [i for i in range(len(store.items)) if i not in excluded]
        best = sorted(allowed, key=lambda i: -scores[row, i])[: spec.depth]
        assert valid[: spec.top].all() and set(listed[: spec.top]) <= set(best)
        ranks = [best.index(i) for i in listed[: spec.top]]
        assert ranks == sorted(ranks)  # in the teacher's order
        np.testing.assert_array_equal(teacher.ranked(spec.depth)[train_row], best)
        # uniform items: never in the user's train history, as the training negatives
        drawn = listed[spec.top :]
        assert len(set(drawn)) == len(drawn) and not set(drawn) & seen_by(store, row_user)
        for item, kept in zip(drawn, valid[spec.top :]):
            assert kept == (item not in best)


def test_the_top_items_are_drawn_with_weights_falling_with_rank_and_redrawn(store, teacher):
    spec = ListSpec(depth=12, top=3, temperature=3.0, uniform=0)
    draws = 4000
    row = int(training_batch(store, size=1).train_rows[0])
    batch = store.training_batch(np.full(draws, row), np.zeros((draws, 1), dtype=np.int64))
    users = teacher.users(batch)
    first, _, _ = rrd_lists(batch, users, teacher, store, spec, np.random.default_rng(1))
    again, _, _ = rrd_lists(batch, users, teacher, store, spec, np.random.default_rng(2))
    assert not np.array_equal(list_items(first), list_items(again))  # redrawn
    ranking = list(teacher.ranked(spec.depth)[row])
    ranks = np.vectorize(ranking.index)(list_items(first))
    assert (np.diff(ranks, axis=1) > 0).all()  # distinct, in the teacher's order
    # Sampling without replacement with weights w_r = exp(-r / T): the best sampled item
    # has rank r with probability that no better rank is drawn first, computed exactly.
    weights = np.exp(-np.arange(spec.depth) / spec.temperature)
    expected = np.zeros(spec.depth)
    for order in itertools.permutations(range(spec.depth), spec.top):
        left, chance = weights.sum(), 1.0
        for rank in order:
            chance *= weights[rank] / left
            left -= weights[rank]
        expected[min(order)] += chance
    counts = np.bincount(ranks[:, 0], minlength=spec.depth)
    # every count within 4.5 standard deviations of its binomial expectation
    assert np.all(np.abs(counts - draws * expected) < 4.5 * np.sqrt(draws * expected) + 1)


def test_listmle_on_rrd_lists_orders_the_top_and_keeps_uniform_items_in_every_denominator(
    store, teacher
):
    spec = ListSpec(depth=40, top=5, temperature=10.0, uniform=15)
    batch = training_batch(store, size=8)
    lists, target, _ = rrd_lists(
        batch, teacher.users(batch), teacher, store, spec, np.random.default_rng(2)
    )
    student = torch.randn(target.shape, generator=torch.Generator().manual_seed(0))
    loss = listmle_loss(student, target, mask=lists.mask, top_k=spec.top)
    expected = []
    for s, valid in zip(student.tolist(), lists.mask.tolist()):
        uniform = [math.exp(v) for v, ok in zip(s[spec.top :], valid[spec.top :]) if ok]
        top = s[: spec.top]
        expected.append(
            sum(
                -math.log(math.exp(top[k]) / (sum(map(math.exp, top[k:])) + sum(uniform)))
                for k in range(spec.top)
            )
            / spec.top
        )
    assert loss.item() == pytest.approx(np.mean(expected), rel=1e-5)


def teacher_stage(**overrides):
    return stage(
        losses=(LossTerm("softmax_ce"), LossTerm("listnet", "teacher", 1.0, {"temperature": 2.0})),
        lists=ListSpec(depth=20, top=8, uniform=8),
        **overrides,
    )


def test_a_resumed_run_on_rrd_lists_reaches_the_same_result(store, teacher, tmp_path):
    straight = fresh_model(store)
    Trainer(teacher_stage(), straight, {"teacher": teacher}, store, tmp_path / "straight").fit()
    cut = tmp_path / "cut"
    Trainer(teacher_stage(epochs=1), fresh_model(store), {"teacher": teacher}, store, cut).fit()
    # the same stage with more epochs: resume the one-epoch run's checkpoint
    checkpoint = cut / "checkpoint.pt"
    payload = torch.load(checkpoint, weights_only=True)
    payload["spec"] = payload["spec"].replace('"epochs": 1', '"epochs": 3')
    torch.save(payload, checkpoint)
    resumed = fresh_model(store, seed=99)
    Trainer(teacher_stage(), resumed, {"teacher": teacher}, store, cut).fit(resume=True)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert log_of(cut)[-1]["valid_ndcg@10"] == log_of(tmp_path / "straight")[-1]["valid_ndcg@10"]


def test_score_terms_train_on_the_rrd_lists_label_terms_on_the_training_lists(
    store, teacher, tmp_path
):
    trainer = Trainer(teacher_stage(), fresh_model(store), {"teacher": teacher}, store, tmp_path)
    trainer.model.eval()  # no dropout: the two computations must see the same model
    batch = next(trainer.lists.epoch(0))
    loss = trainer.loss(batch, 0, 0)
    lists, target, _ = rrd_lists(
        batch,
        teacher.users(batch),
        teacher,
        store,
        trainer.spec.lists,
        np.random.default_rng([trainer.spec.seed, 0, 0, 1]),
    )
    model = trainer.model
    labels = torch.nn.functional.cross_entropy(
        model(batch), torch.zeros(batch.examples, dtype=torch.long)
    )
    student, teacher_scores = model(lists) / 2.0, target / 2.0
    log_p = teacher_scores.masked_fill(~lists.mask, -torch.inf).log_softmax(-1)
    log_q = student.masked_fill(~lists.mask, -torch.inf).log_softmax(-1)
    kl = torch.where(lists.mask, log_p.exp() * (log_p - log_q), 0.0).sum(-1).mean()
    torch.testing.assert_close(loss, labels + 4.0 * kl)


def test_lists_are_checked():
    with pytest.raises(ValueError, match="no loss of this stage learns from a teacher's scores"):
        stage(lists=ListSpec())
    with pytest.raises(ValueError, match="no loss of this stage"):
        stage(lists=ListSpec(), losses=(LossTerm("feature_mse", "teacher"),))
    with pytest.raises(ValueError, match=r"listmle on teacher-ranked lists .* top_k ≤ lists.top"):
        stage(lists=ListSpec(top=10), losses=(LossTerm("listmle", "teacher"),))
    with pytest.raises(ValueError, match=r"top_k ≤ lists.top \(10\)"):
        stage(lists=ListSpec(top=10), losses=(LossTerm("listmle", "teacher", 1.0, {"top_k": 20}),))
    stage(lists=ListSpec(top=10), losses=(LossTerm("listmle", "teacher", 1.0, {"top_k": 10}),))
    config = {
        "models": {"small": {}},
        "stages": {
            "teacher": {"model": "small", "losses": [{"fn": "softmax_ce"}]},
            "student": {
                "model": "small",
                "lists": {"depth": 100, "teacher_top": 5},
                "losses": [{"fn": "listnet", "source": "teacher"}],
            },
        },
    }
    with pytest.raises(ValueError, match=r"lists: unknown key\(s\) \['teacher_top'\]"):
        parse_run_config(config)
    config["stages"]["student"]["lists"] = {"depth": 100}
    assert parse_run_config(config).stage("student").lists == ListSpec(depth=100)
    for bad in ({"top": 0}, {"top": 600}, {"uniform": -1}, {"temperature": 0.0}):
        with pytest.raises(ValueError, match="lists need"):
            ListSpec(**bad)
