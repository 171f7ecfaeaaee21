"""Build a run's teachers from outside from their ``[teachers.*]`` specs (and the objects
handed to ``recdistill.train``), each tried on a few of the run's lists before anything is
trained: a bad model, graph or table is a :class:`~recdistill.errors.TeacherError` then."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from recdistill.data.feature_store import FeatureStore
from recdistill.errors import TeacherError
from recdistill.external.adapter import DataIds, contract_teacher
from recdistill.external.contract import FEATURE_PREFIX, USER
from recdistill.external.embeddings import EmbeddingTeacher
from recdistill.external.logged import LoggedScores
from recdistill.external.spec import EMBEDDINGS, ONNX, PYTHON, SCORES, TeacherSpec
from recdistill.external.tensor import ITEM_ID, USER_ID, Runner, TensorTeacher, tensor_teacher
from recdistill.external.vocabulary import IndexMap
from recdistill.teachers import Teacher


def load_teacher(
    spec: TeacherSpec, store: FeatureStore, *, given: Any = None, cache: Path | None = None
) -> Teacher:
    """The teacher ``spec`` describes (``given``: the object ``recdistill.train`` was handed
    for it), answering on ``store``'s lists; what it computes per train row goes to
    ``cache``."""
    if spec.in_python and given is None:
        raise TeacherError(
            f"{spec.where}: a {spec.kind} teacher without a file is handed over in Python: "
            f"recdistill.train(config, data, out, teachers={{{spec.name!r}: ...}})"
        )
    if given is not None and not spec.in_python:
        raise TeacherError(
            f"{spec.where}: a {spec.kind} teacher is read from its files; "
            "it cannot also be handed over in Python"
        )
    if spec.kind == EMBEDDINGS:
        return EmbeddingTeacher(spec.name, spec, store, cache)
    if spec.kind == SCORES:
        return LoggedScores(spec.name, spec, store)
    if spec.kind == PYTHON:
        if isinstance(given, torch.nn.Module):
            raise TeacherError(
                f'{spec.where}: a torch module is kind = "torch" (its forward takes the '
                "contract's tensors); kind python takes an object with score(lists)"
            )
        return contract_teacher(spec.name, given, store, cache=cache)
    return contract_teacher(spec.name, tensor_model(spec, store, given), store, cache=cache)


def tensor_model(spec: TeacherSpec, store: FeatureStore, given: Any) -> TensorTeacher:
    """A torch module (``given``, or built by the spec's factory) or an ONNX graph of the
    tensor form, as a teacher model tried on a few of ``store``'s lists."""
    fingerprint = None
    runner: Runner
    if spec.kind == ONNX:
        from recdistill.external.onnx_graph import OnnxRunner

        runner = OnnxRunner(spec.path, spec.where, store.history_length, torch.get_num_threads())
        fingerprint, params = runner.fingerprint, runner.params
    else:
        from recdistill.external.torch_module import TorchRunner, load_module

        module = given
        if given is None:
            module, fingerprint = load_module(spec.factory, spec.weights, spec.where)
        runner = TorchRunner(module, spec.where, store.user_features)
        params = runner.params
        fingerprint = fingerprint or getattr(module, "fingerprint", None)
    return tensor_teacher(
        runner,
        vocabularies(spec, store, runner.inputs),
        DataIds(store).probe(),
        history_length=store.history_length,
        batch_size=spec.batch_size,
        where=spec.where,
        fingerprint=fingerprint,
        params=params,
    )


def vocabularies(
    spec: TeacherSpec, store: FeatureStore, reads: tuple[str, ...]
) -> dict[str, IndexMap]:
    """The index maps of item IDs, user IDs and every user feature, declared or not; those the
    runner reads must know every value the data has."""
    features = store.user_features
    unknown = sorted(set(spec.vocabulary) - {ITEM_ID, USER_ID, *features})
    if unknown:
        raise TeacherError(
            f"{spec.where}: vocabulary names {unknown}; it maps {[ITEM_ID, USER_ID, *features]}"
        )
    maps = {
        key: IndexMap.read(spec.vocabulary.get(key), f"{spec.where} vocabulary {key}")
        for key in (ITEM_ID, USER_ID, *features)
    }
    ids = DataIds(store)
    maps[ITEM_ID].require(ids.items[1:], "the data's items")
    if USER in reads:
        maps[USER_ID].require(ids.users[1:], "the data's users")
    for name in features:
        if FEATURE_PREFIX + name in reads:
            maps[name].require(np.unique(ids.features[name][1:]), f"the data's {name} values")
    return maps
