import hashlib

import numpy as np
import pytest

from recdistill.config import routing_from
from recdistill.routing import BUCKETS, Routing, bucket

CONFIG = {
    "salt": "exp-1",
    "arms": {
        "control": {"model": "popularity", "share": 0.2},
        "teacher": {"model": "teacher", "share": 0.3},
        "student": {"model": "student", "share": 0.5},
    },
}


def test_bucket_is_sha256_of_salt_and_user_mod_10000():
    digest = hashlib.sha256(b"exp-1:42").hexdigest()
    assert bucket("exp-1", 42) == int(digest, 16) % 10_000


def test_assignment_is_deterministic_and_matches_the_bucket_ranges():
    routing = routing_from(CONFIG)
    users = np.arange(5_000)
    first, second = routing.arms_of(users), routing.arms_of(users)
    np.testing.assert_array_equal(first, second)
    for user in users[:500]:
        b = bucket("exp-1", int(user))
        expected = 0 if b < 2_000 else 1 if b < 5_000 else 2
        assert routing.arm_of(int(user)).name == routing.arms[expected].name
        assert first[user] == expected


def test_shares_hold_within_one_percent_over_100k_users():
    routing = routing_from(CONFIG)
    counts = np.bincount(routing.arms_of(np.arange(100_000)), minlength=3) / 100_000
    np.testing.assert_allclose(counts, [0.2, 0.3, 0.5], atol=0.01)


def test_a_new_salt_reshuffles_users():
    a = routing_from(CONFIG).arms_of(np.arange(2_000))
    b = routing_from({**CONFIG, "salt": "exp-2"}).arms_of(np.arange(2_000))
    # Independent assignments agree with probability 0.2² + 0.3² + 0.5² = 0.38.
    assert abs(np.mean(a == b) - 0.38) < 0.04


def test_single_model_routing_sends_everyone_to_it():
    routing = Routing.single("student")
    assert {routing.arm_of(u).name for u in range(100)} == {"student"}
    assert routing.bounds[-1] == BUCKETS


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({**CONFIG, "arms": {"a": {"model": "m", "share": 0.5}}}, "add up to 0.5"),
        ({**CONFIG, "colour": 1}, "unknown key"),
        ({"arms": CONFIG["arms"]}, "salt"),
        ({**CONFIG, "arms": {"a": {"model": "m"}}}, "exactly `model` and `share`"),
        (
            {
                **CONFIG,
                "arms": {"a": {"model": "m", "share": -1.0}, "b": {"model": "m", "share": 2.0}},
            },
            "positive",
        ),
        ({**CONFIG, "arms": {}}, "at least one arm"),
        ({**CONFIG, "design": "bandit"}, "design must be one of"),
        ({**CONFIG, "design": "interleaving"}, "no share"),
        (
            {**CONFIG, "design": "interleaving", "arms": {"a": {"model": "m"}}},
            "two arms' rankings, not 1",
        ),
    ],
)
def test_bad_configs_are_refused_with_a_reason(table, message):
    with pytest.raises(ValueError, match=message):
        routing_from(table)


def test_an_interleaving_design_takes_two_arms_and_no_shares():
    table = {
        "salt": "s",
        "design": "interleaving",
        "arms": {"student": {"model": "student"}, "teacher": {"model": "teacher"}},
    }
    routing = routing_from(table)
    assert routing.interleaved and [arm.share for arm in routing.arms] == [0.5, 0.5]
    assert not routing_from(CONFIG).interleaved
