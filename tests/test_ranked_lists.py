import numpy as np
import pytest
import torch

from recdistill import ranked_lists
from recdistill.data.batches import FeatureStore
from recdistill.pipeline import stages_from
from recdistill.ranked_lists import ListSpec, RankedLists, top_unseen
from recdistill.stage import LossTerm
from recdistill.train import Trainer
from tests.test_train import fresh_model, log_of, stage


@pytest.fixture(scope="module")
def store(synthetic_dir):
    return FeatureStore(synthetic_dir, history_length=10)


def vectors(store, seed=0):
    generator = torch.Generator().manual_seed(seed)
    users = torch.randn(len(store.users), 6, generator=generator)
    items = torch.randn(len(store.items), 6, generator=generator)
    bias = torch.randn(len(store.items), generator=generator)
    return users, items, bias


def seen_by(store, user):
    return set(store.history.values[store.history.offsets[user] : store.history.offsets[user + 1]])


def test_top_unseen_is_the_best_unseen_items_whatever_the_chunk(store, tmp_path, monkeypatch):
    users, items, bias = vectors(store)
    whole = np.array(top_unseen(users, items, bias, store, 7, tmp_path / "whole.npy"))
    monkeypatch.setattr(ranked_lists, "CELLS", 3 * len(store.items))  # three users per chunk
    chunked = np.array(top_unseen(users, items, bias, store, 7, tmp_path / "chunked.npy"))
    np.testing.assert_array_equal(whole, chunked)
    scores = (users @ items.T + bias).numpy()
    for user in (1, 17, len(store.users) - 1):
        allowed = [i for i in range(1, len(store.items)) if i not in seen_by(store, user)]
        expected = sorted(allowed, key=lambda i: -scores[user, i])[:7]
        assert list(whole[user]) == expected
    assert not (tmp_path / "whole.npy.partial").exists()


def test_too_few_unseen_items_for_teacher_top_is_an_error(store, tmp_path):
    users, items, bias = vectors(store)
    with pytest.raises(ValueError, match="fewer than teacher_top"):
        top_unseen(users, items, bias, store, len(store.items), tmp_path / "top.npy")


def test_ranked_batches_put_the_top_first_and_mask_sampled_repeats(store, tmp_path):
    users, items, bias = vectors(store)
    top = top_unseen(users, items, bias, store, 5, tmp_path / "top.npy")
    lists = RankedLists(store, {"teacher": top}, sampled=40)
    picked = np.array([1, 2, 2, 30])
    batch = lists.batch("teacher", picked, np.random.default_rng(0))
    rows = batch.items["item_id"].values().numpy()[batch.candidates.numpy()]
    np.testing.assert_array_equal(rows[:, :5], np.asarray(top)[picked])
    for row, user, mask in zip(rows, picked, batch.mask.numpy()):
        assert not set(row[5:]) & seen_by(store, user)
        assert list(mask[5:]) == [item not in set(row[:5]) for item in row[5:]]
    # every list sees its user's whole history: no target is left out of it
    assert batch.users["history"].lengths().tolist() == [
        min(10, len(seen_by(store, u))) for u in picked
    ]


def teacher_stage(**overrides):
    return stage(
        losses=(LossTerm("softmax_ce"), LossTerm("listnet", "teacher", 1.0, {"temperature": 2.0})),
        lists=ListSpec(teacher_top=8, sampled=8),
        **overrides,
    )


def test_ranked_lists_are_cached_and_a_resumed_run_reaches_the_same_result(
    store, tmp_path, monkeypatch
):
    teacher = fresh_model(store, seed=7)
    straight = fresh_model(store)
    Trainer(teacher_stage(), straight, {"teacher": teacher}, store, tmp_path / "straight").fit()
    cached = list((tmp_path / "straight").glob("teacher_top_teacher_8_*.npy"))
    assert len(cached) == 1

    cut = tmp_path / "cut"
    Trainer(teacher_stage(epochs=1), fresh_model(store), {"teacher": teacher}, store, cut).fit()
    written = next(cut.glob("teacher_top_*.npy")).stat().st_mtime_ns

    def must_not_recompute(*args, **kwargs):
        raise AssertionError("a resumed stage recomputed its teacher-ranked lists")

    monkeypatch.setattr("recdistill.train.top_unseen", must_not_recompute)
    resumed = fresh_model(store, seed=99)
    # the same stage with more epochs: resume the one-epoch run's checkpoint
    checkpoint = cut / "checkpoint.pt"
    payload = torch.load(checkpoint, weights_only=True)
    payload["spec"] = payload["spec"].replace('"epochs": 1', '"epochs": 3')
    torch.save(payload, checkpoint)
    Trainer(teacher_stage(), resumed, {"teacher": teacher}, store, cut).fit(resume=True)
    assert next(cut.glob("teacher_top_*.npy")).stat().st_mtime_ns == written
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert [r["valid_ndcg@10"] for r in log_of(cut)] == [
        r["valid_ndcg@10"] for r in log_of(tmp_path / "straight")
    ]


def test_another_teacher_gets_its_own_lists(store, tmp_path):
    for seed in (7, 8):
        spec = teacher_stage(epochs=1)
        teacher = fresh_model(store, seed=seed)
        Trainer(spec, fresh_model(store), {"teacher": teacher}, store, tmp_path / str(seed)).fit()
    first, second = (next((tmp_path / s).glob("*.npy")).name for s in ("7", "8"))
    assert first != second


def test_score_terms_train_on_the_ranked_lists_label_terms_on_the_training_lists(store, tmp_path):
    teacher = fresh_model(store, seed=7)
    trainer = Trainer(teacher_stage(), fresh_model(store), {"teacher": teacher}, store, tmp_path)
    trainer.model.eval()  # no dropout: the two computations must see the same model
    batch = next(trainer.lists.epoch(0))
    ranked = trainer.ranked_batches(batch, 0, 0)
    assert set(ranked) == {"teacher"} and ranked["teacher"].list_size == 16
    with_lists = trainer.loss(batch, ranked)
    labels_alone = LossTerm("softmax_ce")
    model = trainer.model
    expected = labels_alone.weight * torch.nn.functional.cross_entropy(
        model(batch), torch.zeros(batch.examples, dtype=torch.long)
    ) + 4.0 * ranked_lists_listnet(model, trainer, ranked["teacher"])
    torch.testing.assert_close(with_lists, expected)


def ranked_lists_listnet(model, trainer, lists):
    student = model(lists) / 2.0
    teacher = trainer.teacher_outputs(lists)["teacher"][2] / 2.0
    mask = lists.mask
    log_p = teacher.masked_fill(~mask, -torch.inf).log_softmax(-1)
    log_q = student.masked_fill(~mask, -torch.inf).log_softmax(-1)
    kl = torch.where(mask, log_p.exp() * (log_p - log_q), 0.0).sum(-1)
    return kl.mean()


def test_lists_need_a_teacher_score_term_and_known_keys():
    with pytest.raises(ValueError, match="no loss of this stage learns from a teacher's scores"):
        stage(lists=ListSpec())
    with pytest.raises(ValueError, match="no loss of this stage"):
        stage(lists=ListSpec(), losses=(LossTerm("feature_mse", "teacher"),))
    config = {
        "stages": {
            "student": {
                "model": "small",
                "lists": {"teacher_top": 5, "top": 3},
                "losses": [{"fn": "listnet", "source": "teacher"}],
            }
        }
    }
    with pytest.raises(ValueError, match=r"\[stages.student\] lists: unknown key\(s\) \['top'\]"):
        stages_from(config)
    config["stages"]["student"]["lists"] = {"teacher_top": 5}
    assert stages_from(config)[0].lists == ListSpec(teacher_top=5, sampled=50)
    with pytest.raises(ValueError, match="teacher_top ≥ 1"):
        ListSpec(teacher_top=0)
