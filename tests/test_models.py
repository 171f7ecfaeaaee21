import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from recdistill.config import load_run_config
from recdistill.data.batches import TrainLists, TrainSequences
from recdistill.data.feature_store import FeatureStore
from recdistill.losses import LOSSES
from recdistill.models import Dropout, FeatureSpace, TwoTower, TwoTowerSpec
from tests.conftest import PROJECT, run_docstring_example


@pytest.fixture(scope="module")
def store(synthetic_dir):
    return FeatureStore(synthetic_dir, history_length=10)


def space_of(store):
    return FeatureSpace.of(store)


def test_scores_are_dot_products_of_the_towers_plus_item_bias(store):
    torch.manual_seed(0)
    model = TwoTower(TwoTowerSpec(embedding_dim=8, tower=(12, 6), feature_dim=2), space_of(store))
    torch.nn.init.normal_(model.item_bias.weight)
    batch = next(TrainLists(store, batch_size=16, negatives=4).epoch(0))
    scores = model(batch)
    assert scores.shape == (16, 5)
    users, items = model.towers(batch)
    item_ids = batch.items["item_id"].values()
    for row in range(16):
        for slot in range(5):
            item_row = batch.candidates[row, slot]
            expected = users[row] @ items[item_row] + model.item_bias.weight[item_ids[item_row], 0]
            assert scores[row, slot].item() == pytest.approx(expected.item(), abs=1e-5)


def test_the_docstring_example_holds():
    run_docstring_example(TwoTower)


def test_size_and_cost_accounting(store):
    spec = TwoTowerSpec(embedding_dim=8, tower=(12, 6), feature_dim=2)
    model = TwoTower(spec, space_of(store))
    sizes = store.cardinalities()
    user_input = 8 + 8 + 2 * len(store.user_features)
    item_input = 8 + 8
    embeddings = (sizes["user_id"] + sizes["history"] + sizes["item_id"] + sizes["genres"]) * 8
    embeddings += sum(sizes[name] * 2 for name in store.user_features)
    mlp = (user_input * 12 + 12 + 12 * 6 + 6) + (item_input * 12 + 12 + 12 * 6 + 6)
    assert model.parameter_count() == embeddings + mlp + sizes["item_id"]
    macs = model.multiply_adds(list_size=100)
    assert macs["item_tower"] == item_input * 12 + 12 * 6
    assert macs["per_candidate"] == pytest.approx(
        macs["item_tower"] + 6 + (user_input * 12 + 12 * 6) / 100
    )


def test_towers_must_meet_in_one_dimension(store):
    with pytest.raises(ValueError, match="towers end in"):
        TwoTower(TwoTowerSpec(embedding_dim=8, tower=(), feature_dim=2), space_of(store))


def test_student_preset_is_tiny_next_to_the_teacher(ml100k, tmp_path):
    from recdistill.cli import main

    main(["data", "movielens", "--path", str(ml100k), "--out", str(tmp_path / "d")])
    space = space_of(FeatureStore(tmp_path / "d"))
    config = load_run_config(PROJECT / "configs" / "ml100k.toml")
    roles = config.roles
    models = {
        name: TwoTower(config.preset(stage), space)
        for name, stage in (("teacher", roles.reference), ("student", roles.student))
    }
    teacher, student = models["teacher"], models["student"]
    assert teacher.parameter_count() >= 20 * student.parameter_count()
    assert teacher.multiply_adds()["per_candidate"] >= 50 * student.multiply_adds()["per_candidate"]


def sequence_spec(**overrides):
    values = {
        "embedding_dim": 8,
        "tower": (8,),
        "feature_dim": 2,
        "user_encoder": "sequence",
        "max_length": 6,
        "layers": 2,
        "heads": 2,
    }
    return TwoTowerSpec(**(values | overrides))


def user_vectors(model, store, users, histories):
    history = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories])
    lengths = np.array([len(h) for h in histories])
    return model.user_tower(store.user_kjt(np.asarray(users), history, lengths))


@pytest.mark.parametrize("readout", ["last", "attention"])
def test_sequence_encoder_reads_the_most_recent_max_length_items_in_order(store, readout):
    torch.manual_seed(0)
    model = TwoTower(sequence_spec(readout=readout), space_of(store)).eval()
    if readout == "attention":
        torch.nn.init.normal_(model.user_tower.sequence.query)
    history = [5, 9, 2, 7, 3, 8]
    same = user_vectors(model, store, [1, 1], [history, history + [11, 12]])
    # Items beyond max_length are not read; the order of the rest matters.
    torch.testing.assert_close(same[0], same[1])
    swapped = user_vectors(model, store, [1], [[9, 5, 2, 7, 3, 8]])
    assert not torch.allclose(same[0], swapped[0])


def test_sequence_positions_see_only_themselves_and_older_items(store):
    torch.manual_seed(0)
    model = TwoTower(sequence_spec(), space_of(store)).eval()
    kjt = lambda h: store.user_kjt(np.array([1]), np.array(h), np.array([len(h)]))
    outputs, real = model.user_tower.positions(kjt([5, 9, 2, 7]))
    changed, _ = model.user_tower.positions(kjt([6, 9, 2, 7]))  # a newer item 0 changed
    assert real[0].tolist() == [True] * 4 + [False] * 2
    torch.testing.assert_close(outputs[0, 1:4], changed[0, 1:4])
    assert not torch.allclose(outputs[0, 0], changed[0, 0])
    # Position 0 of the whole history is the user vector the "last" readout serves.
    torch.testing.assert_close(outputs[0, 0], model.user_tower(kjt([5, 9, 2, 7]))[0])
    # Position 1 is the user vector the history had before item 5 arrived.
    torch.testing.assert_close(outputs[0, 1], model.user_tower(kjt([9, 2, 7]))[0])


def test_dropout_zeroes_a_share_p_and_rescales_the_rest_in_training_only(store):
    torch.manual_seed(0)
    dropout = Dropout(0.3)
    x = torch.full((200_000,), 2.0, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.3) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 2.0 / 0.7))
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.7)
    assert dropout.eval()(x) is x
    assert Dropout(0.0)(x) is x
    # Any shape, its element count a multiple of four or not; each element drawn anew.
    odd = Dropout(0.5)(torch.ones(3, 5, 7))
    assert odd.shape == (3, 5, 7) and set(odd.unique().tolist()) == {0.0, 2.0}
    assert not torch.equal(Dropout(0.5)(torch.ones(1000)), Dropout(0.5)(torch.ones(1000)))
    encoder = TwoTower(sequence_spec(dropout=0.1), space_of(store)).user_tower.sequence
    assert all(
        isinstance(module, Dropout)
        for module in encoder.modules()
        if "Dropout" in type(module).__name__
    )


def test_an_empty_history_gives_finite_vectors_and_gradients(store):
    torch.manual_seed(0)
    model = TwoTower(sequence_spec(dropout=0.1), space_of(store))
    vectors = user_vectors(model, store, [1, 2], [[], [4]])
    vectors.sum().backward()
    assert torch.isfinite(vectors).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_next_item_scores_put_each_window_positions_target_first(store):
    torch.manual_seed(0)
    model = TwoTower(sequence_spec(), space_of(store)).eval()
    torch.nn.init.normal_(model.item_bias.weight)
    batch = next(TrainSequences(store, max_length=6, batch_size=8, negatives=3).epoch(0))
    scores, labels = model.next_item_scores(batch)
    assert scores.shape == (batch.examples, 4)
    assert (labels[:, 0] == 1).all() and (labels[:, 1:] == 0).all()
    users, real = model.user_tower.positions(batch.users)
    items = model.item_tower(batch.items)
    item_ids = batch.items["item_id"].values()
    window, position = torch.nonzero(real & batch.has_target)[0]
    target = batch.targets[window, position]
    expected = users[window, position] @ items[target] + model.item_bias.weight[item_ids[target], 0]
    assert scores[0, 0].item() == pytest.approx(expected.item(), abs=1e-5)


def test_next_item_scores_against_every_item_are_a_full_softmax_over_the_catalogue(store):
    torch.manual_seed(0)
    model = TwoTower(sequence_spec(), space_of(store)).eval()
    torch.nn.init.normal_(model.item_bias.weight)
    windows = TrainSequences(store, max_length=6, batch_size=8, negatives=3, all_items=True)
    batch = next(windows.epoch(0))
    assert batch.negatives.shape == (8, 0)
    assert batch.items["item_id"].values().tolist() == list(range(len(store.items)))
    scores, labels = model.next_item_scores(batch)
    assert scores.shape == (batch.examples, len(store.items))
    users, real = model.user_tower.positions(batch.users)
    catalogue = model.item_tower(store.catalogue())
    window, position = torch.nonzero(real & batch.has_target)[0]
    target = int(batch.targets[window, position])
    expected = users[window, position] @ catalogue.T + model.item_bias.weight[:, 0]
    torch.testing.assert_close(scores[0], expected, atol=1e-5, rtol=1e-5)
    assert labels[0].nonzero().flatten().tolist() == [target]
    # softmax_ce on it is the cross-entropy of the target against the whole catalogue
    loss = LOSSES["softmax_ce"](scores[:1], labels[:1], mask=torch.ones_like(labels[:1]).bool())
    by_hand = math.log(sum(math.exp(v) for v in expected.tolist())) - expected[target].item()
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)


def test_train_sequences_predict_each_train_item_from_the_items_before_it(store):
    sequences = TrainSequences(store, max_length=4, batch_size=32, negatives=3)
    seen = []
    for batch in sequences.epoch(0):
        users = batch.users["user_id"].values().numpy()
        history = batch.users["history"]
        item_ids = batch.items["item_id"].values().numpy()
        for row, (values, user) in enumerate(zip(history.to_dense(), users)):
            full = store.history.values[
                store.history.offsets[user] : store.history.offsets[user + 1]
            ]
            targets = item_ids[batch.targets[row][batch.has_target[row]].numpy()]
            end = int(np.flatnonzero(full == targets[0])[0])
            # Window e reads h[e + 1 : e + 5]; its position j is followed by h[e + j].
            assert values.tolist() == full[end + 1 : end + 5].tolist()
            assert targets.tolist() == full[end : end + len(targets)].tolist()
            negatives = item_ids[batch.negatives[row].numpy()]
            assert not set(negatives) & set(full)
            seen += [(user, t) for t in targets]
    expected = [
        (u, i)
        for u in range(1, len(store.users))
        for i in store.history.values[store.history.offsets[u] : store.history.offsets[u + 1] - 1]
    ]
    assert sorted(seen) == sorted(expected)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"heads": 3}, "heads \\(3\\) must divide embedding_dim \\(8\\)"),
        ({"max_length": 0}, "max_length must be at least 1"),
        ({"user_encoder": "lstm"}, "unknown user_encoder 'lstm'"),
        ({"embedding_dim": 2, "tower": (2,), "heads": 4}, "cannot have 4 heads"),
        ({"readout": "mean"}, "unknown readout 'mean'"),
        ({"recent_length": 3}, "a sequence encoder already reads the order"),
        ({"dropout": 1.0}, "dropout must be at least 0 and below 1, not 1.0"),
        ({"dropout": -0.1}, "dropout must be at least 0 and below 1, not -0.1"),
    ],
)
def test_bad_sequence_specs_are_refused_with_a_message(overrides, message):
    with pytest.raises(ValueError, match=message):
        sequence_spec(**overrides)


def test_recent_bag_pools_the_newest_items_in_the_history_table(store):
    torch.manual_seed(0)
    spec = TwoTowerSpec(
        embedding_dim=4, tower=(4,), feature_dim=2, recent_length=2, user_table=False
    )
    model = TwoTower(spec, FeatureSpace.of(store)).eval()
    kjt = store.user_kjt(np.array([1, 2, 3]), np.array([5, 9, 2, 7, 3]), np.array([3, 0, 2]))
    pooled = model.user_tower.pooled(kjt)
    table = model.user_tower.embeddings.embedding_bags["table_history"].weight
    # keys: history, recent, then the demographic features; an empty history pools zeros
    torch.testing.assert_close(pooled[0, :4], table[[5, 9, 2]].mean(0))
    torch.testing.assert_close(pooled[0, 4:8], table[[5, 9]].mean(0))
    torch.testing.assert_close(pooled[1, :8], torch.zeros(8))
    torch.testing.assert_close(pooled[2, 4:8], table[[7, 3]].mean(0))
    assert "table_user_id" not in model.user_tower.embeddings.embedding_bags
    with_table = TwoTower(replace(spec, user_table=True), space_of(store))
    # the table, and the first layer's weights for its 4 more inputs
    assert with_table.parameter_count() - model.parameter_count() == 4 * len(store.users) + 4 * 4


def test_recent_length_must_not_be_negative():
    with pytest.raises(ValueError, match="recent_length must be 0"):
        TwoTowerSpec(recent_length=-1)
