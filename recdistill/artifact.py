"""Self-contained serving artifacts: export a trained model, load and validate it.

An artifact directory holds

- ``manifest.json``: format, name, kind (``two_tower``, ``popularity``, ``ease``,
  ``ensemble`` or ``external``), parameter count,
  quantization (as in ``spec.json``), the SHA-256 of every other file, and the version: a hash of those file hashes, so equal
  contents always get the same version;
- ``model.safetensors``: the weights (int8 codes with their scales for a quantized model;
  for ``popularity``: the item train counts; for ``ease``, an ensemble's member: the item ×
  item matrix, refitted from the run's data with its ``l2``; for ``ensemble``: its members'
  weights);
- ``members/<name>/``: an ensemble's members, each an artifact of its own (an ensemble is
  served where its members can be: an ``ease`` member holds ``items²`` float32 weights,
  16 MB at 2,000 items, 1.6 GB at 20,000);
- ``teacher/``: an ``external`` artifact's teacher from outside the run, as its
  ``[teachers.*]`` table read it: the ONNX graph, or the torch module's weights (its factory
  must be importable where the artifact is served), and its vocabulary tables;
- ``spec.json``: the model spec (every field of ``TwoTowerSpec``: a sequence user encoder's
  ``user_encoder``, ``max_length``, ``layers``, ``heads`` and ``readout`` among them), its
  feature space, the history length it was trained with and its ``quantization`` (``null``,
  or which parts are int8: ``recdistill.quantize``);
- ``vocabularies.json``: the external IDs and category values behind every embedding row;
- ``features/``: the online feature snapshot in the canonical data layout (``users.parquet``
  with demographics, ``items.parquet`` with genres, ``train.parquet`` and ``valid.parquet``,
  the interactions the user histories are built from, and ``meta.json``), read by the same
  ``FeatureStore`` code as training and seen as it stands at the test interactions
  (``FeatureStore.known_at("test")``), so a user's features at serving time are exactly those
  the model was tested on.

Loading re-hashes every file and checks vocabularies, spec and weight shapes and dtypes
against each other; any mismatch is an :class:`ArtifactError` that says what is wrong. A
weight that is NaN or infinite is refused on export and on load, named.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.numpy import save_file
from safetensors.torch import load_file

from recdistill.baselines import Ease
from recdistill.config import load_run_config
from recdistill.data.feature_store import FeatureStore
from recdistill.data.tables import EXTERNAL_ID, read_meta
from recdistill.ensembles import BASELINE_MEMBERS, EaseMember
from recdistill.errors import ArtifactError
from recdistill.external.spec import ONNX, TORCH, TeacherSpec
from recdistill.files import atomic_output_dir, write_json
from recdistill.layout import ArtifactLayout, DataLayout, RunLayout
from recdistill.manifest import (
    EASE,
    ENSEMBLE,
    EXTERNAL,
    FORMAT,
    POPULARITY,
    TWO_TOWER,
    Manifest,
    read_manifest,
)
from recdistill.models import FeatureSpace, TwoTower, TwoTowerSpec
from recdistill.quantize import QuantizationSpec, load_plain_state, plain_state, quantize
from recdistill.recipe import read_record
from recdistill.summary import (
    BaselineModel,
    CandidateResult,
    ChosenModel,
    EnsembleModel,
    ExternalModel,
    SweepSummary,
    TrainedModel,
    from_json,
    read_summary,
    to_json,
)

COUNTS = "item_train_counts"
EASE_WEIGHTS = "ease_weights"
MEMBER_WEIGHTS = "member_weights"
MEMBERS = "members"
TEACHER = "teacher"


@dataclass
class Artifact:
    """A loaded, validated artifact: the model (or popularity counts) and its feature store."""

    directory: Path
    name: str
    kind: str
    version: str
    params: int
    store: FeatureStore
    model: TwoTower | None
    counts: torch.Tensor | None
    quantization: QuantizationSpec | None = None
    # An ``ease`` artifact: its item × item weights and the half-life of its history weights.
    ease: EaseMember | None = None
    # An ``ensemble`` artifact: its member artifacts and their weights.
    members: dict[str, tuple[Artifact, float]] | None = None
    # An ``external`` artifact: the teacher from outside the run (a TeacherModel).
    teacher: Any = None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "version": self.version,
            "params": self.params,
            "quantization": None if self.quantization is None else self.quantization.describe(),
            "user_encoder": None if self.model is None else self.model.spec.user_encoder,
            "artifact": str(self.directory),
        }


def export_artifact(run: Path, model_name: str, out: Path, *, data: Path | None = None) -> Manifest:
    """Write the artifact of ``model_name`` from run directory ``run``; returns the manifest.

    ``data`` overrides the data directory recorded in the run's ``summary.json``. A model whose
    summary entry has a ``quantization`` table is exported with its int8 weights as they are.
    """
    return _export(run, model_name, out, data, as_member=False)


def _export(
    run: Path, model_name: str, out: Path, data: Path | None, *, as_member: bool
) -> Manifest:
    """:func:`export_artifact`; ``as_member``, also an EASE baseline, as an ensemble's member
    (it reads the history the ensemble's member reads, not the baseline's whole history)."""
    layout = RunLayout(Path(run))
    summary = read_summary(layout.summary)
    config = load_run_config(layout.config)
    data = Path(data or summary.data)
    read_meta(data)
    # A sweep's candidates too, the chosen one or not: the rule's choice is not the only
    # student someone may want to serve or compare.
    models = summary.models | (summary.candidates if isinstance(summary, SweepSummary) else {})
    exportable = [name for name, entry in models.items() if not isinstance(entry, BaselineModel)]
    exportable += [POPULARITY, *(BASELINE_MEMBERS if as_member else ())]
    if model_name not in exportable:
        raise ValueError(
            f"cannot export {model_name!r} from {layout.root}; exportable: {exportable}"
        )
    entry = models.get(model_name)
    record = None
    if isinstance(entry, TrainedModel | ChosenModel | CandidateResult):
        record = read_record(layout.stage(model_name))
    length = config.history_length if record is None else record.history_length
    store = FeatureStore(data, history_length=length)
    quantization = None
    if record is not None and record.quantization is not None:
        quantization = dataclasses.asdict(record.quantization)

    with atomic_output_dir(out) as scratch:
        artifact = ArtifactLayout(scratch)
        _write_features(DataLayout(data), artifact.features)
        if model_name == POPULARITY:
            kind, params = POPULARITY, 0
            counts = store.item_train_counts.astype(np.float32)
            save_file({COUNTS: counts}, str(artifact.weights))
            spec_json: dict[str, Any] = {"kind": kind, "history_length": length}
        elif model_name in BASELINE_MEMBERS:
            kind, params = EASE, entry.params
            weights = Ease.fit(store, entry.l2).weights.astype(np.float32)
            save_file({EASE_WEIGHTS: weights}, str(artifact.weights))
            half_life = entry.half_life  # None: plain EASE, every history item weighs 1
            spec_json = {"kind": kind, "history_length": length, "l2": entry.l2}
            spec_json["half_life"] = half_life
        elif isinstance(entry, ExternalModel):
            kind, params = EXTERNAL, entry.params or 0
            save_file({}, str(artifact.weights))
            spec_json = {
                "kind": kind,
                "history_length": length,
                "teacher": _copy_teacher(config.teachers[model_name], scratch / TEACHER),
            }
        elif isinstance(entry, EnsembleModel):
            kind, params = ENSEMBLE, entry.params
            for member in entry.weights:
                _export(run, member, scratch / MEMBERS / member, data, as_member=True)
            member_weights = np.array(list(entry.weights.values()), dtype=np.float32)
            save_file({MEMBER_WEIGHTS: member_weights}, str(artifact.weights))
            spec_json = {"kind": kind, "history_length": length, "members": list(entry.weights)}
        else:
            kind = TWO_TOWER
            spec = record.model
            weights = layout.stage(model_name).weights
            _check_finite(_read_weights(weights), f"cannot export {model_name!r} from {weights}")
            shutil.copyfile(weights, artifact.weights)
            params = entry.params
            spec_json = {
                "kind": kind,
                "model": dataclasses.asdict(spec),
                "user_features": list(store.user_features),
                "cardinalities": store.cardinalities(),
                "history_length": length,
                "quantization": quantization,
            }
        write_json(artifact.spec, spec_json)
        write_json(artifact.vocabularies, _vocabularies(store))
        files = {
            str(path.relative_to(scratch)): _sha256(path)
            for path in sorted(scratch.rglob("*"))
            if path.is_file()
        }
        manifest = Manifest(
            format=FORMAT,
            name=model_name,
            kind=kind,
            version=_version(files),
            params=params,
            quantization=quantization,
            files=files,
            exported_from={"run": str(layout.root), "data": str(data)},
            # A candidate the sweep did not choose was never scored on test.
            offline_metrics=getattr(entry, "metrics", {}),
            role=None if config.roles is None else config.roles.role_of(model_name),
        )
        write_json(artifact.manifest, to_json(manifest))
    return manifest


def load_artifact(directory: Path) -> Artifact:
    directory = Path(directory)
    layout = ArtifactLayout(directory)
    manifest = read_manifest(directory)
    for name, expected in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"artifact {directory} is incomplete: {name} is missing")
        actual = _sha256(path)
        if actual != expected:
            raise ArtifactError(
                f"artifact {directory} is corrupt: {name} has SHA-256 {actual[:12]}…, "
                f"the manifest says {expected[:12]}…"
            )
    if _version(manifest.files) != manifest.version:
        raise ArtifactError(f"artifact {directory}: version does not match the file hashes")

    spec_json = json.loads(layout.spec.read_text())
    store = FeatureStore(layout.features.root, history_length=spec_json["history_length"])
    vocabularies = json.loads(layout.vocabularies.read_text())
    if vocabularies != _vocabularies(store):
        raise ArtifactError(
            f"artifact {directory}: {layout.vocabularies.name} does not match the feature snapshot"
        )
    weights = _read_weights(layout.weights)
    _check_finite(weights, f"artifact {directory}")
    model, counts, quantization, ease, members, teacher = None, None, None, None, None, None
    if manifest.kind == POPULARITY:
        counts = weights.get(COUNTS)
        if counts is None or counts.shape != (len(store.items),):
            raise ArtifactError(
                f"artifact {directory}: expected {COUNTS} of shape ({len(store.items)},)"
            )
    elif manifest.kind == EASE:
        items = len(store.items)
        matrix = weights.get(EASE_WEIGHTS)
        if matrix is None or matrix.shape != (items, items):
            raise ArtifactError(
                f"artifact {directory}: expected {EASE_WEIGHTS} of shape ({items}, {items})"
            )
        half_life = spec_json["half_life"]
        ease = EaseMember(matrix, math.inf if half_life is None else half_life)
    elif manifest.kind == ENSEMBLE:
        names = spec_json["members"]
        member_weights = weights.get(MEMBER_WEIGHTS)
        if member_weights is None or member_weights.shape != (len(names),):
            raise ArtifactError(
                f"artifact {directory}: expected {MEMBER_WEIGHTS} of shape ({len(names)},)"
            )
        members = {}
        for name, weight in zip(names, member_weights.tolist(), strict=True):
            if read_manifest(directory / MEMBERS / name).kind == EXTERNAL:
                raise ArtifactError(
                    f"artifact {directory}: member {name!r} is a teacher from outside"
                )
            member = load_artifact(directory / MEMBERS / name)
            if member.store.history_length != store.history_length:
                raise ArtifactError(
                    f"artifact {directory}: member {name!r} reads {member.store.history_length} "
                    f"history items, the ensemble {store.history_length}"
                )
            members[name] = (member, weight)
    elif manifest.kind == EXTERNAL:
        teacher = _load_teacher(spec_json["teacher"], directory / TEACHER, store)
    else:
        if spec_json["cardinalities"] != store.cardinalities():
            raise ArtifactError(
                f"artifact {directory}: {layout.spec.name}'s table sizes {spec_json['cardinalities']} "
                f"do not match the feature snapshot's {store.cardinalities()}"
            )
        try:
            spec = from_json(TwoTowerSpec, spec_json["model"])
            quantization = from_json(QuantizationSpec | None, spec_json.get("quantization"))
        except ValidationError as error:
            raise ArtifactError(f"artifact {directory}: {layout.spec.name}: {error}") from error
        model = TwoTower(spec, FeatureSpace.of(store))
        if quantization is not None:
            model = quantize(model, quantization)
        _check_shapes(directory, plain_state(model), weights)
        load_plain_state(model, weights)
        model.eval()
    return Artifact(
        directory=directory,
        name=manifest.name,
        kind=manifest.kind,
        version=manifest.version,
        params=manifest.params,
        store=store.known_at("test"),
        model=model,
        counts=counts,
        quantization=quantization,
        ease=ease,
        members=members,
        teacher=teacher,
    )


def _copy_teacher(spec: TeacherSpec, out: Path) -> dict[str, Any]:
    """Copy the files of a torch or onnx teacher into ``out``; its table, paths relative."""
    if spec.in_python or spec.kind not in (TORCH, ONNX):
        how = "handed over in Python" if spec.in_python else f"a {spec.kind} teacher"
        raise ValueError(
            f"{spec.where}: {how} cannot be served; a teacher from outside is served from its "
            "ONNX graph or its torch factory and weights"
        )
    out.mkdir(parents=True)
    table: dict[str, Any] = {"kind": spec.kind, "batch_size": spec.batch_size}
    if spec.kind == ONNX:
        table["path"] = "model.onnx"
        shutil.copyfile(spec.path, out / table["path"])
    else:
        table |= {"factory": spec.factory, "weights": "weights.safetensors"}
        shutil.copyfile(spec.weights, out / table["weights"])
    table["vocabulary"] = {}
    for key, path in spec.vocabulary.items():
        table["vocabulary"][key] = f"{key}.vocabulary.parquet"
        shutil.copyfile(path, out / table["vocabulary"][key])
    return table


def _load_teacher(table: dict[str, Any], directory: Path, store: FeatureStore) -> Any:
    """The teacher of an ``external`` artifact, its files read from ``directory``."""
    from recdistill.external.load import tensor_model

    paths = {
        key: str(directory / value) for key, value in table.items() if key in ("path", "weights")
    }
    vocabulary = {key: str(directory / value) for key, value in table["vocabulary"].items()}
    spec = TeacherSpec(name=directory.parent.name, **{**table, **paths, "vocabulary": vocabulary})
    return tensor_model(spec, store, None)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ArtifactError(f"{path} is not a readable safetensors file: {error}") from error


def _check_finite(weights: dict[str, torch.Tensor], where: str) -> None:
    for key, tensor in weights.items():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ArtifactError(f"{where}: tensor {key!r} has {bad} non-finite values")


def _check_shapes(
    directory: Path, expected: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]
) -> None:
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ArtifactError(
            f"artifact {directory}: weights do not fit the spec "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for key, tensor in expected.items():
        if weights[key].shape != tensor.shape:
            raise ArtifactError(
                f"artifact {directory}: {key} has shape {tuple(weights[key].shape)}, "
                f"the spec needs {tuple(tensor.shape)}"
            )
        if weights[key].dtype != tensor.dtype:
            raise ArtifactError(
                f"artifact {directory}: {key} is {weights[key].dtype}, the spec needs {tensor.dtype}"
            )


def _write_features(data: DataLayout, out: DataLayout) -> None:
    """The columns the feature store reads, and nothing else."""
    out.root.mkdir()
    meta = read_meta(data.root)
    write_json(out.meta, {"source": meta["source"], "user_features": meta["user_features"]})
    for source, target, columns in (
        (data.users, out.users, ["user_id", *meta["user_features"]]),
        (data.items, out.items, ["item_id", "genres"]),
    ):
        if EXTERNAL_ID in pq.read_schema(source).names:
            columns.append(EXTERNAL_ID)
        pq.write_table(pq.read_table(source, columns=columns), target)
    for split in ("train", "valid"):
        columns = ["user_id", "item_id", "timestamp"]
        pq.write_table(pq.read_table(data.split(split), columns=columns), out.split(split))


def _vocabularies(store: FeatureStore) -> dict[str, list]:
    vocabularies = {"user_id": store.users.values.tolist(), "item_id": store.items.values.tolist()}
    vocabularies["genres"] = store.genres.values.tolist()
    vocabularies |= {name: v.values.tolist() for name, v in store.feature_vocabularies.items()}
    return vocabularies


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(files: dict[str, str]) -> str:
    listing = "\n".join(f"{name} {digest}" for name, digest in sorted(files.items()))
    return hashlib.sha256(listing.encode()).hexdigest()[:16]
