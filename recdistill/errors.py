"""The project's own errors, each reported by the CLI as one clear line: a malformed input
file or artifact (ValueErrors, like every bad input) and failures that are not a bad input. Kept free of
heavy imports: the CLI catches them before torch is loaded."""

from __future__ import annotations

from pathlib import Path


class DataFormatError(ValueError):
    """A malformed input file: ``str(error)`` reads ``<path> line <n>: <problem>``.

    ``line`` is ``None`` when the problem concerns the whole file (e.g. it is empty);
    ``unit`` is ``"row"`` for files without lines (Parquet) and DataFrames.
    """

    def __init__(
        self, path: Path | str, line: int | None, problem: str, unit: str = "line"
    ) -> None:
        # Passing every argument to ValueError keeps the error picklable (args rebuild it).
        super().__init__(path, line, problem, unit)
        self.path = path
        self.line = line
        self.problem = problem
        self.unit = unit

    def __str__(self) -> str:
        where = str(self.path) if self.line is None else f"{self.path} {self.unit} {self.line}"
        return f"{where}: {self.problem}"


class ArtifactError(ValueError):
    """An artifact that is missing, corrupt or inconsistent."""


class TeacherError(ValueError):
    """A teacher from outside the run that cannot teach as given: a model, graph or table
    whose inputs, outputs, vocabulary or values do not meet the teacher contract
    (``recdistill.external``). Raised before a run directory is written where it can be."""


class TrainingDiverged(RuntimeError):
    """A stage's loss or gradients stopped being finite; its weights were not stepped."""


class MissingExtra(ImportError):
    """A feature asked for needs an optional dependency that is not installed: the message
    says which extra installs it."""
