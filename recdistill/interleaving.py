"""Team-draft interleaving (Radlinski et al., CIKM 2008; Chapelle et al., TOIS 2012): one
slate merged from two rankings, each shown item credited to the arm that placed it.

The arms take turns as two captains picking a team: in each round a fair coin says which
picks first, then the other picks; each adds its best-ranked item not already shown. A
click on an item credits the arm that placed it, so the arm whose items users prefer earns
more clicks, whatever the position, and an item both arms would show is credited to either
by the coin, so it favours neither.

Shared by the server (``recdistill serve`` with ``design = "interleaving"``) and the
simulator; numpy only.
"""

from __future__ import annotations

import numpy as np

# The `arm` of an interleaved request in the impression log and the /rank response; its
# `teams` name the arm that placed each shown item.
INTERLEAVED = "interleaved"


def team_draft(
    first: np.ndarray, second: np.ndarray, k: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Merge two rankings of the same candidates into slates of ``k``.

    ``first`` and ``second`` are ``[requests, >= k]`` candidate indices, best first (each row
    distinct; the top ``k`` of each is all a slate of ``k`` can use). Returns the shown
    indices ``[requests, k]`` and the team of each, ``0`` for ``first`` and ``1`` for
    ``second``.
    """
    first, second = np.asarray(first)[:, :k], np.asarray(second)[:, :k]
    if first.shape != second.shape or first.shape[1] < k:
        raise ValueError(
            f"two rankings of at least {k} items each, not {first.shape} and {second.shape}"
        )
    requests = len(first)
    rows = np.arange(requests)
    rankings = np.stack([first, second])  # [team, requests, k]
    shown = np.empty((requests, k), dtype=first.dtype)
    teams = np.empty((requests, k), dtype=np.int8)
    sizes = np.zeros((2, requests), dtype=np.int64)
    coins = rng.random((requests, (k + 1) // 2)) < 0.5  # per round: does `second` pick first?
    for position in range(k):
        # A round is two picks; the coin decides its first pick, the team behind picks next.
        ahead = sizes[0] - sizes[1]
        team = np.where(ahead > 0, 1, np.where(ahead < 0, 0, coins[:, position // 2]))
        ranking = rankings[team, rows]  # [requests, k]
        taken = (ranking[:, :, None] == shown[:, None, :position]).any(axis=2)
        pick = np.argmax(~taken, axis=1)  # a ranking of k holds an untaken item at every pick
        shown[:, position] = ranking[rows, pick]
        teams[:, position] = team
        sizes[team, rows] += 1
    return shown, teams
