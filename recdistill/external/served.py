"""A teacher from outside the run answering ``POST /rank`` and the A/B simulator, as an arm.

A request becomes one list of the contract: the user's own ID, the request's moment (the
server's clock), the history the server builds for every model (the request's recent items,
stamped with that moment, then the user's known history with its times, newest first, capped)
and the candidates. A user the data does not know is sent as ID 0 (``""`` for string IDs), and
so are its features, which a tensor graph receives as index 0. A candidate the data does not know is not sent: it
gets the mean score of the request's known candidates, as a two-tower scores an unknown item
as the mean item.
"""

from __future__ import annotations

import time

import numpy as np

from recdistill.data.feature_store import UNKNOWN, FeatureStore
from recdistill.external.adapter import DataIds
from recdistill.external.contract import TeacherLists, TeacherModel


class ServedTeacher:
    """``model`` scoring requests on ``store``'s features (an artifact's snapshot)."""

    def __init__(self, model: TeacherModel, store: FeatureStore) -> None:
        self.model = model
        self.store = store
        ids = DataIds(store)
        self.items = ids.items
        self.users = _unknown_first(ids.users)
        self.features = {name: _unknown_first(values) for name, values in ids.features.items()}

    def scores(
        self,
        users: np.ndarray,
        candidates: np.ndarray,
        histories: list[np.ndarray],
        times: list[np.ndarray],
    ) -> np.ndarray:
        """``[lists, C]`` scores of candidate item indices ``candidates`` for user indices
        ``users``, each list reading its history (item indices, newest first) and their times."""
        lengths = np.array([len(h) for h in histories], dtype=np.int64)
        width = int(lengths.max(initial=0))
        history = np.zeros((len(users), width), dtype=np.int64)
        stamps = np.zeros_like(history)
        for row, (items, moments) in enumerate(zip(histories, times, strict=True)):
            history[row, : len(items)], stamps[row, : len(items)] = items, moments
        known = candidates != UNKNOWN
        # Unknown candidates are sent as the list's first known one and given the mean below.
        first = np.where(known.any(1), candidates[np.arange(len(candidates)), known.argmax(1)], 1)
        sent = np.where(known, candidates, first[:, None])
        lists = TeacherLists(
            users=self.users[users],
            moments=np.full(len(users), int(time.time()), dtype=np.int64),
            history=self.items[history],
            history_times=stamps,
            history_length=lengths,
            candidates=self.items[sent],
            features={
                name: values[self.store.user_codes[name][users]]
                for name, values in self.features.items()
            },
        )
        scores = np.asarray(self.model.score(lists), dtype=np.float32)
        mean = np.where(known, scores, 0.0).sum(1) / np.maximum(known.sum(1), 1)
        return np.where(known, scores, mean[:, None]).astype(np.float32)

    def snapshot(self, users: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The known histories (items and times) of user indices ``users``, capped."""
        items, times, lengths = self.store.history_of(users)
        ends = np.cumsum(lengths)
        return np.split(items, ends[:-1]), np.split(times, ends[:-1])


def _unknown_first(values: np.ndarray) -> np.ndarray:
    """``values`` with index 0 an ID no vocabulary holds: 0 for integers, "" for strings."""
    values = values.copy()
    values[UNKNOWN] = 0 if values.dtype.kind in "iu" else ""
    return values
