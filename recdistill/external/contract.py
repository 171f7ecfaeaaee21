"""The teacher contract: what a teacher from outside the run is asked, and what it answers.

A frozen teacher answers for ranking lists *at their own moment*. recdistill hands it a batch
of lists (:class:`TeacherLists`): for each list its user, its moment, the user's history
strictly before that moment (newest first, capped at the run's ``history_length``), the
user's features and the candidate items. The teacher returns one score per candidate
(:meth:`TeacherModel.score`). A two-tower teacher may also give its user vector of each list
and its item vector of each candidate (:meth:`TeacherModel.vectors`); its score must then be
their dot product plus a bias that depends on the item alone, and recdistill computes the
user vector of every training list once and the item vectors of the catalogue once.

IDs are the user's own, integers or strings, as the data has them. "Before the moment" is
the data's own order: a training list's history is every interaction of its user that
comes before the list's positive in the split (interactions that share a second are ordered
by the split's seeded tie-breaking key, as every model of the run sees them), an evaluation
list's every interaction before its held-out one. No item at or after the list's moment is
ever in its history.

Torch modules and ONNX graphs see the same lists as named int64 tensors (the *tensor form*):

=================  ===========  ====================================================
input              shape        what it holds
=================  ===========  ====================================================
``user``           ``[B]``      the list's user, as an index of the user vocabulary
``moment``         ``[B]``      the list's moment, in seconds
``history``        ``[B, L]``   the history's items as indices of the item vocabulary,
                                newest first; 0 past ``history_length``
``history_time``   ``[B, L]``   each history item's time in seconds; 0 past it
``history_length`` ``[B]``      how many history positions are real
``feature_NAME``   ``[B]``      user feature ``NAME``, as an index of its vocabulary
``candidates``     ``[B, C]``   the candidates, as indices of the item vocabulary
=================  ===========  ====================================================

``L`` is the run's ``history_length``, every batch padded to it. A graph takes the inputs it
names (``candidates`` is required; the others are optional) and gives ``scores`` (float32
``[B, C]``), and for a two-tower teacher also ``user_vector`` (``[B, D]``) and
``item_vectors`` (``[B, C, D]``). An index is a row of the teacher's own vocabulary when it
declares one (``vocabulary`` in ``[teachers.NAME]``: per ID kind a Parquet table with one
column, row ``k`` the ID of index ``k``, a null row an index no ID has); without one, integer
IDs are their own index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

# The tensor form's inputs and outputs, by name.
USER, MOMENT, HISTORY, HISTORY_TIME, HISTORY_LENGTH, CANDIDATES = (
    "user",
    "moment",
    "history",
    "history_time",
    "history_length",
    "candidates",
)
INPUTS = (USER, MOMENT, HISTORY, HISTORY_TIME, HISTORY_LENGTH, CANDIDATES)
FEATURE_PREFIX = "feature_"
SCORES, USER_VECTOR, ITEM_VECTORS = "scores", "user_vector", "item_vectors"
OUTPUTS = (SCORES, USER_VECTOR, ITEM_VECTORS)


@dataclass(frozen=True)
class TeacherLists:
    """A batch of ``B`` ranking lists at their moments, with the user's own IDs.

    ``users`` ``[B]``, ``moments`` ``[B]`` (seconds), ``history`` ``[B, L]`` (item IDs, newest
    first; entries at and past ``history_length[b]`` are padding, their values unspecified),
    ``history_times`` ``[B, L]`` (seconds), ``history_length`` ``[B]``, ``features`` (user
    feature name to ``[B]`` values) and ``candidates`` ``[B, C]`` (item IDs).
    """

    users: np.ndarray
    moments: np.ndarray
    history: np.ndarray
    history_times: np.ndarray
    history_length: np.ndarray
    candidates: np.ndarray
    features: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.users)

    def rows(self, selected: slice | np.ndarray) -> TeacherLists:
        """The lists ``selected``."""
        return TeacherLists(
            users=self.users[selected],
            moments=self.moments[selected],
            history=self.history[selected],
            history_times=self.history_times[selected],
            history_length=self.history_length[selected],
            candidates=self.candidates[selected],
            features={name: values[selected] for name, values in self.features.items()},
        )

    def with_candidates(self, candidates: np.ndarray) -> TeacherLists:
        """The same lists with other candidates (``[B, C']``)."""
        return TeacherLists(
            users=self.users,
            moments=self.moments,
            history=self.history,
            history_times=self.history_times,
            history_length=self.history_length,
            candidates=candidates,
            features=self.features,
        )


@runtime_checkable
class TeacherModel(Protocol):
    """Anything that scores :class:`TeacherLists`: the contract every teacher meets.

    ``score`` returns ``[B, C]`` finite floats, one per candidate. A two-tower teacher also
    has ``vectors``, returning the user vector of each list ``[B, D]`` and the item vector of
    each candidate ``[B, C, D]``; its scores must then be their dot product plus a bias of the
    item alone. Optional attributes: ``fingerprint`` (a string that changes when the model
    does: what it computes per training row is then cached on disk and reused by a resumed
    run) and ``params`` (its parameter count, for the run's summary).
    """

    def score(self, lists: TeacherLists) -> np.ndarray: ...
