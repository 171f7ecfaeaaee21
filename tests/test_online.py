import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from recdistill.artifact import load_artifact
from recdistill.data.feature_store import UNKNOWN
from recdistill.online import OnlineRanker, Ranking

TWO_TOWERS = ("teacher", "intermediate", "student")


@pytest.fixture(scope="module")
def offline_scores(tiny_run):
    _, run = tiny_run
    return load_file(run / "scores_test.safetensors")


@pytest.fixture(scope="module")
def rankers(tiny_artifacts):
    return {
        (name, precompute): OnlineRanker(load_artifact(tiny_artifacts[name]), precompute_items=p)
        for name in (*TWO_TOWERS, "popularity")
        for precompute, p in (("online", False), ("precomputed", True))
    }


@pytest.mark.parametrize("mode", ["online", "precomputed"])
@pytest.mark.parametrize("name", [*TWO_TOWERS, "popularity"])
def test_online_scores_equal_the_offline_scores(rankers, offline_scores, name, mode):
    ranker = rankers[name, mode]
    for row in range(0, len(offline_scores["user_id"]), 37):
        user, candidates = offline_scores["user_id"][row], offline_scores["candidates"][row]
        ranking = ranker.rank(int(user), candidates)
        served = dict(zip(ranking.items.tolist(), ranking.scores.tolist()))
        np.testing.assert_allclose(
            [served[item] for item in candidates.tolist()],
            offline_scores[name][row],
            rtol=1e-5,
            atol=1e-5,
        )
        assert not ranking.cold_start and len(ranking.unknown) == 0


def test_rankings_are_sorted_and_keep_every_candidate(rankers, offline_scores):
    ranking = rankers["student", "online"].rank(
        int(offline_scores["user_id"][0]), offline_scores["candidates"][0]
    )
    assert np.all(np.diff(ranking.scores) <= 0)
    assert sorted(ranking.items.tolist()) == sorted(offline_scores["candidates"][0].tolist())


def _known(ranker):
    store = ranker.store
    return int(store.users.values[0]), store.items.values[:20]


def rank_as_the_mean_user(ranker: OnlineRanker, items: np.ndarray) -> Ranking:
    """``ranker``'s ranking of ``items`` for an unknown user without history, checked to be
    scored with the mean user vector."""
    ranking = ranker.rank(-7, items)
    assert ranking.cold_start
    rows = torch.as_tensor(ranker.store.items.index(items))
    expected = ranker.item_vectors[rows] @ ranker.mean_user + ranker.item_bias[rows]
    served = dict(zip(ranking.items.tolist(), ranking.scores.tolist()))
    np.testing.assert_allclose([served[i] for i in items.tolist()], expected, rtol=1e-5, atol=1e-5)
    return ranking


@pytest.mark.parametrize("mode", ["online", "precomputed"])
def test_an_unknown_user_without_history_gets_the_mean_user_vector(rankers, mode):
    ranker = rankers["student", mode]
    _, items = _known(ranker)
    rank_as_the_mean_user(ranker, items)


def test_an_unknown_user_with_recent_items_is_ranked_from_that_history(rankers):
    ranker = rankers["student", "online"]
    _, items = _known(ranker)
    cold = ranker.rank(-7, items).scores
    session = ranker.rank(-7, items, recent_items=items[:3])
    other_session = ranker.rank(-7, items, recent_items=items[10:13])
    assert session.cold_start
    assert not np.allclose(session.scores, cold)
    assert not np.allclose(np.sort(session.scores), np.sort(other_session.scores))


def test_recent_items_go_in_front_of_the_history(rankers):
    ranker = rankers["student", "online"]
    store = ranker.store
    user, items = _known(ranker)
    index = int(store.users.index(np.array([user]))[0])
    recent = store.items.values[-2:]
    history = store.history.values[store.history.offsets[index] : store.history.offsets[index + 1]]
    bag = np.concatenate([store.items.index(recent), history])[: store.history_length]
    features = store.user_kjt(np.array([index]), bag, np.array([len(bag)]))
    expected = ranker.artifact.model.user_tower(features)[0]
    rows = torch.as_tensor(store.items.index(items))
    scores = ranker.scores(index, rows.numpy(), recent)
    torch.testing.assert_close(
        scores, ranker.item_vectors[rows] @ expected + ranker.item_bias[rows]
    )


def test_unknown_recent_items_are_ignored(rankers):
    ranker = rankers["student", "online"]
    user, items = _known(ranker)
    plain = ranker.rank(user, items)
    with_unknown = ranker.rank(user, items, recent_items=np.array([-1, -2]))
    np.testing.assert_array_equal(plain.scores, with_unknown.scores)


@pytest.mark.parametrize("mode", ["online", "precomputed"])
def test_unknown_candidates_score_as_the_average_item_and_are_listed(rankers, mode):
    ranker = rankers["student", mode]
    user, items = _known(ranker)
    ranking = ranker.rank(user, np.concatenate([items[:5], [-100, -200]]))
    assert ranking.unknown.tolist() == [-100, -200]
    served = dict(zip(ranking.items.tolist(), ranking.scores.tolist()))
    assert served[-100] == served[-200]
    index = int(ranker.store.users.index(np.array([user]))[0])
    mean_item = ranker.scores(index, np.array([UNKNOWN]))
    assert served[-100] == pytest.approx(float(mean_item[0]), rel=1e-5)
    vectors = ranker.item_vectors[1:]
    assert torch.allclose(ranker.item_vectors[UNKNOWN], vectors.mean(0))


def test_popularity_scores_an_unknown_item_as_never_seen(rankers):
    ranker = rankers["popularity", "online"]
    user, items = _known(ranker)
    ranking = ranker.rank(user, np.concatenate([items[:5], [-100]]))
    assert ranking.items[-1] == -100 and ranking.scores[-1] == 0
