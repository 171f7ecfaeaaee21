import numpy as np
import pytest

from recdistill.data.sampling import pair_keys, sample_unseen


def test_samples_are_unseen_distinct_and_cover_the_unseen_items():
    rng = np.random.default_rng(0)
    n_items = 30
    users = np.array([0, 1, 2])
    seen = {0: {1, 2, 3}, 1: set(range(20)), 2: set()}
    seen_keys = np.unique(
        np.concatenate(
            [
                pair_keys(np.full(len(s), u), np.array(sorted(s), int), n_items)
                for u, s in seen.items()
            ]
        )
    )
    drawn_for_user_1 = set()
    for _ in range(50):
        sample = sample_unseen(users, 8, seen_keys, n_items, rng)
        assert sample.shape == (3, 8)
        for row, user in zip(sample, users):
            assert len(set(row)) == 8
            assert not set(row) & seen[user]
            assert all(0 <= item < n_items for item in row)
        drawn_for_user_1 |= set(sample[1])
    assert drawn_for_user_1 == set(range(20, 30))


def test_first_item_is_respected():
    sample = sample_unseen(
        np.zeros(100, int), 5, np.array([], np.int64), 10, np.random.default_rng(1), first_item=1
    )
    assert sample.min() >= 1


def test_impossible_request_is_a_clear_error():
    seen = pair_keys(np.zeros(8, int), np.arange(8), 10)
    with pytest.raises(ValueError, match="seen too many"):
        sample_unseen(np.array([0]), 5, seen, 10, np.random.default_rng(0))
