import numpy as np
import pytest
import torch

from recdistill.data.feature_store import FeatureStore
from recdistill.inference import PlainUserTower, UserVectorCache
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


@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
@pytest.mark.parametrize("name", SPECS)
def test_the_plain_user_tower_equals_the_torchrec_one(store, name, int8):
    torch.manual_seed(0)
    model = TwoTower(SPECS[name], FeatureSpace.of(store)).eval()
    if SPECS[name].readout == "attention":
        torch.nn.init.normal_(model.user_tower.sequence.query)  # zeros would weigh all alike
    if int8:
        model = quantize(model, QuantizationSpec())
    plain = PlainUserTower(model.user_tower)
    rng = np.random.default_rng(0)
    known = [1, 2, 57, len(store.users) - 1]
    cases = [(user, store.history.gather(np.array([user]), limit=10)[0]) for user in known]
    cases += [
        (0, np.array([], dtype=np.int64)),  # a cold user without recent items
        (0, rng.integers(1, len(store.items), size=4)),  # a cold user with recent items
        (5, rng.integers(1, len(store.items), size=14)[:10]),  # recent items before the history
        (7, np.array([], dtype=np.int64)),  # a known user whose history is empty
    ]
    for user, history in cases:
        kjt = store.user_kjt(np.array([user]), history, np.array([len(history)]))
        codes = {name: int(store.user_codes[name][user]) for name in store.user_features}
        with torch.inference_mode():
            expected = model.user_tower(kjt)[0]
            got = plain(user, torch.as_tensor(history, dtype=torch.int64), codes)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_the_user_vector_cache_keeps_the_most_recently_used_users():
    cache = UserVectorCache(capacity=2)
    computed = []

    def vector_of(user):
        def compute():
            computed.append(user)
            return torch.full((2,), float(user))

        return compute

    for user in (1, 2, 1, 3, 2, 1):
        assert cache.get(user, vector_of(user))[0] == user
    # 1 and 2 fill it; 1 is a hit; 3 evicts 2 (least recently used); 2 evicts 1; 1 evicts 3.
    assert computed == [1, 2, 3, 2, 1]
    assert (cache.hits, cache.misses) == (1, 5)
    assert list(cache.vectors) == [2, 1]


def test_a_cache_of_capacity_zero_keeps_nothing():
    cache = UserVectorCache(capacity=0)
    for _ in range(3):
        cache.get(1, lambda: torch.ones(2))
    assert (cache.hits, cache.misses, len(cache.vectors)) == (0, 3, 0)


def test_filling_the_cache_keeps_what_fits_and_counts_no_lookup():
    cache = UserVectorCache(capacity=2)
    cache.fill(np.array([4, 5, 6]), torch.arange(6.0).reshape(3, 2))
    assert list(cache.vectors) == [4, 5] and (cache.hits, cache.misses) == (0, 0)
    assert cache.get(5, lambda: torch.zeros(2)).tolist() == [2.0, 3.0]


def test_a_cache_cannot_hold_fewer_than_zero_users():
    with pytest.raises(ValueError, match="0 users or more"):
        UserVectorCache(capacity=-1)
