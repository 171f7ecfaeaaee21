"""The tensor form of the teacher contract, shared by torch modules and ONNX graphs.

A :class:`Runner` takes named int64 arrays (the inputs it reads, ``recdistill.external.
contract`` lists them) and returns named float32 arrays. :func:`tensor_teacher` makes it a
:class:`~recdistill.external.contract.TeacherModel`: the lists' IDs become indices of the
teacher's vocabularies, histories are padded to the run's ``history_length``, lists go
``batch_size`` at a time, and every output is checked for its name, dtype and shape.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from recdistill.errors import TeacherError
from recdistill.external.contract import (
    CANDIDATES,
    FEATURE_PREFIX,
    HISTORY,
    HISTORY_LENGTH,
    HISTORY_TIME,
    INPUTS,
    ITEM_VECTORS,
    MOMENT,
    SCORES,
    USER,
    USER_VECTOR,
    TeacherLists,
)
from recdistill.external.vocabulary import IndexMap

ITEM_ID, USER_ID = "item_id", "user_id"


class Runner(Protocol):
    """A module or graph of the tensor form: ``inputs`` names what it reads."""

    inputs: tuple[str, ...]

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def tensor_teacher(
    runner: Runner,
    vocabularies: dict[str, IndexMap],
    probe: TeacherLists,
    *,
    history_length: int,
    batch_size: int,
    where: str,
    fingerprint: str | None = None,
    params: int | None = None,
) -> TensorTeacher:
    """``runner`` as a teacher, its inputs checked against the contract and its outputs
    learnt from one call on ``probe`` lists: a two-tower teacher when it gives both vectors.
    ``vocabularies`` maps ``item_id``, ``user_id`` and every user feature of the data to its
    index map."""
    settings = {
        "history_length": history_length,
        "batch_size": batch_size,
        "where": where,
        "fingerprint": fingerprint,
        "params": params,
    }
    outputs = TensorTeacher(runner, vocabularies, **settings).run(probe)
    vectors = [name for name in (USER_VECTOR, ITEM_VECTORS) if name in outputs]
    if len(vectors) == 1:
        other = ({USER_VECTOR, ITEM_VECTORS} - set(vectors)).pop()
        raise TeacherError(
            f"{where}: gives {vectors[0]} but not {other}: a two-tower teacher gives both"
        )
    kind = TensorTwoTower if vectors else TensorTeacher
    return kind(runner, vocabularies, **settings)


class TensorTeacher:
    """A runner of the tensor form as a :class:`~recdistill.external.contract.TeacherModel`."""

    def __init__(
        self,
        runner: Runner,
        vocabularies: dict[str, IndexMap],
        *,
        history_length: int,
        batch_size: int,
        where: str,
        fingerprint: str | None = None,
        params: int | None = None,
    ) -> None:
        features = [name for name in vocabularies if name not in (ITEM_ID, USER_ID)]
        known = (*INPUTS, *(FEATURE_PREFIX + name for name in features))
        unknown = [name for name in runner.inputs if name not in known]
        if unknown or CANDIDATES not in runner.inputs:
            problem = f"unknown input(s) {unknown}" if unknown else f"no input named {CANDIDATES!r}"
            raise TeacherError(
                f"{where}: {problem}; the contract's inputs are {list(known)} "
                f"({CANDIDATES!r} required)"
            )
        self.runner = runner
        self.vocabularies = vocabularies
        self.history_length = history_length
        self.batch_size = batch_size
        self.where = where
        self.fingerprint = fingerprint
        self.params = params

    def score(self, lists: TeacherLists) -> np.ndarray:
        return self.run(lists)[SCORES]

    def run(self, lists: TeacherLists) -> dict[str, np.ndarray]:
        """Every output of the runner on ``lists``, ``batch_size`` lists a call, checked."""
        parts = []
        for start in range(0, len(lists), self.batch_size):
            chunk = lists.rows(slice(start, start + self.batch_size))
            parts.append(self._checked(self.runner(self.feed(chunk)), chunk))
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def feed(self, lists: TeacherLists) -> dict[str, np.ndarray]:
        """The inputs the runner reads, for ``lists``."""
        reads = set(self.runner.inputs)
        items = self.vocabularies[ITEM_ID]
        feed = {CANDIDATES: items.indices(lists.candidates)}
        if reads & {HISTORY, HISTORY_TIME, HISTORY_LENGTH}:
            length = np.minimum(lists.history_length, self.history_length).astype(np.int64)
            real = np.arange(self.history_length)[None, :] < length[:, None]
            width = min(lists.history.shape[1], self.history_length)
            history = np.zeros((len(lists), self.history_length), dtype=np.int64)
            times = np.zeros_like(history)
            history[real] = items.indices(lists.history[:, :width][real[:, :width]])
            times[real] = lists.history_times[:, :width][real[:, :width]]
            feed |= {HISTORY: history, HISTORY_TIME: times, HISTORY_LENGTH: length}
        if USER in reads:
            feed[USER] = self.vocabularies[USER_ID].indices(lists.users)
        if MOMENT in reads:
            feed[MOMENT] = lists.moments.astype(np.int64)
        for name in reads:
            if name.startswith(FEATURE_PREFIX):
                feature = name[len(FEATURE_PREFIX) :]
                feed[name] = self.vocabularies[feature].indices(lists.features[feature])
        # An ID a declared vocabulary does not know is sent as index 0: a run checks every ID
        # of its data at load, so only a served request's new user can be one.
        indices = [name for name in feed if name not in (MOMENT, HISTORY_TIME, HISTORY_LENGTH)]
        feed |= {name: np.maximum(feed[name], 0) for name in indices}
        return {name: np.ascontiguousarray(feed[name]) for name in self.runner.inputs}

    def _checked(
        self, outputs: dict[str, np.ndarray], lists: TeacherLists
    ) -> dict[str, np.ndarray]:
        if SCORES not in outputs:
            raise TeacherError(
                f"{self.where}: gives no output named {SCORES!r} (it gives {sorted(outputs)})"
            )
        lists_, candidates = lists.candidates.shape
        expected = {SCORES: ("[B, C]", (lists_, candidates))}
        if USER_VECTOR in outputs:
            width = np.shape(outputs[USER_VECTOR])[-1]
            expected[USER_VECTOR] = ("[B, D]", (lists_, width))
            expected[ITEM_VECTORS] = ("[B, C, D]", (lists_, candidates, width))
        for name, (form, shape) in expected.items():
            if name not in outputs:
                continue
            value = outputs[name]
            if value.dtype != np.float32:
                raise TeacherError(
                    f"{self.where}: output {name!r} is {value.dtype}; the contract gives float32"
                )
            if value.shape != shape:
                raise TeacherError(
                    f"{self.where}: output {name!r} has shape {tuple(value.shape)}; expected "
                    f"{form} = {shape} for {lists_} list(s) of {candidates} candidate(s)"
                )
        return {name: outputs[name] for name in expected if name in outputs}


class TensorTwoTower(TensorTeacher):
    """A runner that also gives ``user_vector`` and ``item_vectors``."""

    def vectors(self, lists: TeacherLists) -> tuple[np.ndarray, np.ndarray]:
        outputs = self.run(lists)
        return outputs[USER_VECTOR], outputs[ITEM_VECTORS]
