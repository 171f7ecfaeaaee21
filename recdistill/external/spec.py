"""``[teachers.NAME]``: a teacher from outside the run, as a config names it.

Four ways in, one table each (docs/external-teachers.md):

- ``kind = "torch"``: a PyTorch module following the tensor contract, built by ``factory``
  (``"package.module:callable"``, called with no arguments) and given the safetensors
  ``weights``; or, with neither key, the module passed to ``recdistill.train(...,
  teachers={NAME: module})``.
- ``kind = "onnx"``: an ONNX graph following the tensor contract, run by ONNX Runtime on the
  CPU (``path``: the ``.onnx`` file).
- ``kind = "embeddings"``: Parquet tables of ``items`` and ``users`` vectors, each row valid
  from its ``valid_from`` time (snapshots); ``missing`` says what a list whose user has no
  snapshot before its moment gets: its history's item vectors averaged (``"history"``), or no
  distillation (``"skip"``).
- ``kind = "scores"``: a Parquet log of the production ranker's scores (``path``): each
  logged request's candidates with their scores become a training list of their own.
- ``kind = "python"``: any object meeting the contract (``recdistill.external.TeacherModel``),
  passed to ``recdistill.train(..., teachers={NAME: obj})``.

``vocabulary`` maps ``item_id``, ``user_id`` and user feature names to Parquet tables of the
teacher's own IDs in its index order (torch and onnx kinds). Paths are resolved against the
working directory when the config is read. This module holds the spec alone: no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

TORCH, ONNX, EMBEDDINGS, SCORES, PYTHON = "torch", "onnx", "embeddings", "scores", "python"
KINDS = (TORCH, ONNX, EMBEDDINGS, SCORES, PYTHON)
# What a list gets from an embeddings teacher when its user has no snapshot before it.
MISSING = ("history", "skip")
# The keys each kind reads; every other key but ``kind`` is refused for it.
KEYS = {
    TORCH: ("factory", "weights", "vocabulary", "batch_size"),
    ONNX: ("path", "vocabulary", "batch_size"),
    EMBEDDINGS: ("items", "users", "missing"),
    SCORES: ("path",),
    PYTHON: ("batch_size",),
}
REQUIRED = {ONNX: ("path",), EMBEDDINGS: ("items", "users"), SCORES: ("path",)}
PATHS = ("path", "weights", "items", "users")


@dataclass(frozen=True)
class TeacherSpec:
    """A ``[teachers.NAME]`` table: where the teacher comes from and how it is read."""

    name: str
    kind: str
    path: str = ""
    factory: str = ""
    weights: str = ""
    vocabulary: dict[str, str] = field(default_factory=dict)
    items: str = ""
    users: str = ""
    missing: str = "history"
    # Lists sent to the model at once (torch, onnx and python kinds).
    batch_size: int = 1024

    def __post_init__(self) -> None:
        where = self.where
        if self.kind not in KINDS:
            raise ValueError(f"{where}: unknown kind {self.kind!r}; choose one of {list(KINDS)}")
        defaults = TeacherSpec.__dataclass_fields__
        given = [
            name
            for name in (*PATHS, "factory", "vocabulary", "batch_size", "missing")
            if getattr(self, name) != _default(defaults[name])
        ]
        refused = [name for name in given if name not in KEYS[self.kind]]
        if refused:
            raise ValueError(
                f"{where}: a {self.kind} teacher does not read {refused}; "
                f"its keys are {list(KEYS[self.kind])}"
            )
        missing = [name for name in REQUIRED.get(self.kind, ()) if not getattr(self, name)]
        if missing:
            raise ValueError(f"{where}: a {self.kind} teacher needs {missing}")
        if self.kind == TORCH and bool(self.factory) != bool(self.weights):
            raise ValueError(
                f'{where}: give both factory = "package.module:callable" and weights = '
                '"file.safetensors", or neither (the module then comes from '
                "recdistill.train(..., teachers=...))"
            )
        if self.factory and ":" not in self.factory:
            raise ValueError(f'{where}: factory is "package.module:callable", not {self.factory!r}')
        if self.missing not in MISSING:
            raise ValueError(
                f"{where}: missing must be one of {list(MISSING)}, not {self.missing!r}"
            )
        if self.batch_size < 1:
            raise ValueError(f"{where}: batch_size must be at least 1, not {self.batch_size}")
        resolved = {name: _resolved(getattr(self, name)) for name in PATHS}
        for name, value in resolved.items():
            object.__setattr__(self, name, value)
        vocabulary = {key: _resolved(value) for key, value in self.vocabulary.items()}
        object.__setattr__(self, "vocabulary", vocabulary)

    @property
    def where(self) -> str:
        return f"[teachers.{self.name}]"

    @property
    def in_python(self) -> bool:
        """Whether the teacher object comes from ``recdistill.train(..., teachers=...)``."""
        return self.kind == PYTHON or (self.kind == TORCH and not self.factory)

    @property
    def scorable(self) -> bool:
        """Whether it can score any list (the run's test lists among them): every kind but
        a log of scores, which holds the lists it logged and no others."""
        return self.kind != SCORES


def _default(spec_field: dataclasses.Field) -> object:
    if spec_field.default_factory is not dataclasses.MISSING:
        return spec_field.default_factory()
    return spec_field.default


def _resolved(path: str) -> str:
    return str(Path(path).resolve()) if path else ""
