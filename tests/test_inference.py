import numpy as np
import pytest
import torch

from recdistill.data.feature_store import FeatureStore
from recdistill.inference import PlainUserTower, supports
from recdistill.models import FeatureSpace, TwoTower, TwoTowerSpec
from recdistill.quantize import QuantizationSpec, quantize

SPECS = {
    "bag": TwoTowerSpec(embedding_dim=8, tower=(16, 8), feature_dim=2),
    "bag_recent_no_user_table": TwoTowerSpec(
        embedding_dim=8, tower=(8,), feature_dim=2, recent_length=3, user_table=False
    ),
    "sequence_last": TwoTowerSpec(
        embedding_dim=8, tower=(8,), user_encoder="sequence", max_length=6, layers=2
    ),
    "sequence_attention": TwoTowerSpec(
        embedding_dim=8, tower=(8,), user_encoder="sequence", max_length=6, readout="attention"
    ),
}


@pytest.fixture(scope="module")
def store(synthetic_dir):
    return FeatureStore(synthetic_dir, history_length=10)


@pytest.mark.parametrize("name", SPECS)
def test_the_plain_user_tower_equals_the_torchrec_one(store, name):
    torch.manual_seed(0)
    model = TwoTower(SPECS[name], FeatureSpace.of(store)).eval()
    if SPECS[name].readout == "attention":
        torch.nn.init.normal_(model.user_tower.sequence.query)  # zeros would weigh all alike
    plain = PlainUserTower(model.user_tower)
    rng = np.random.default_rng(0)
    known = [1, 2, 57, len(store.users) - 1]
    cases = [(user, store.history.gather(np.array([user]), limit=10)[0]) for user in known]
    cases += [
        (0, np.array([], dtype=np.int64)),  # a cold user without recent items
        (0, rng.integers(1, len(store.items), size=4)),  # a cold user with recent items
        (5, rng.integers(1, len(store.items), size=14)[:10]),  # recent items before the history
    ]
    for user, history in cases:
        kjt = store.user_kjt(np.array([user]), history, np.array([len(history)]))
        with torch.inference_mode():
            expected = model.user_tower(kjt)[0]
        codes = {name: int(store.user_codes[name][user]) for name in store.user_features}
        got = plain(user, torch.as_tensor(history, dtype=torch.int64), codes)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_int8_towers_stay_on_the_torchrec_path(store):
    model = TwoTower(SPECS["bag"], FeatureSpace.of(store)).eval()
    assert supports(model.user_tower)
    assert not supports(quantize(model, QuantizationSpec()).user_tower)
    with pytest.raises(ValueError, match="float embedding bags"):
        PlainUserTower(quantize(model, QuantizationSpec()).user_tower)
