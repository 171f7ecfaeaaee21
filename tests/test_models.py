import pytest
import torch

from recdistill.config import load_config, section, spec_from
from recdistill.data.batches import FeatureStore, TrainLists
from recdistill.models import FeatureSpace, TwoTower, TwoTowerSpec
from tests.conftest import PROJECT


@pytest.fixture(scope="module")
def store(synthetic_dir):
    return FeatureStore(synthetic_dir, history_length=10)


def space_of(store):
    return FeatureSpace(store.user_features, store.cardinalities())


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
    config = load_config(PROJECT / "configs" / "ml100k.toml")
    models = {
        name: TwoTower(spec_from(TwoTowerSpec, section(config, f"models.{name}"), name), space)
        for name in ("teacher", "student")
    }
    teacher, student = models["teacher"], models["student"]
    assert teacher.parameter_count() >= 20 * student.parameter_count()
    assert teacher.multiply_adds()["per_candidate"] >= 50 * student.multiply_adds()["per_candidate"]
