import numpy as np
import pytest

from recdistill.interleaving import team_draft


def rankings(requests: int, candidates: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return tuple(np.argsort(rng.random((requests, candidates)), axis=1) for _ in range(2))


def test_each_pick_is_the_teams_best_item_not_yet_shown_and_rounds_stay_even():
    first, second = rankings(500, 12, 0)
    shown, teams = team_draft(first, second, 7, np.random.default_rng(1))
    assert shown.shape == teams.shape == (500, 7)
    for row in range(500):
        placed: list[int] = []
        for item, team in zip(shown[row], teams[row]):
            ranking = (first, second)[team][row]
            assert item == next(i for i in ranking if i not in placed)
            placed.append(item)
        for end in range(2, 8, 2):  # after each round of two picks, one each
            assert teams[row, :end].sum() == end // 2


def test_the_coin_is_fair_and_identical_rankings_show_that_ranking():
    first, _ = rankings(20_000, 10, 2)
    shown, teams = team_draft(first, first, 4, np.random.default_rng(3))
    np.testing.assert_array_equal(shown, first[:, :4])
    assert teams[:, 0].mean() == pytest.approx(0.5, abs=0.015)
    assert teams[:, 2].mean() == pytest.approx(0.5, abs=0.015)


def test_disjoint_rankings_take_turns_from_their_tops():
    first = np.array([[0, 1, 2, 3]])
    second = np.array([[4, 5, 6, 7]])
    shown, teams = team_draft(first, second, 4, np.random.default_rng(0))
    assert sorted(shown[0][teams[0] == 0]) == [0, 1]
    assert sorted(shown[0][teams[0] == 1]) == [4, 5]


def test_too_short_rankings_are_refused():
    with pytest.raises(ValueError, match="at least 5 items"):
        team_draft(np.zeros((1, 3), int), np.zeros((1, 3), int), 5, np.random.default_rng(0))
