"""An artifact's ``manifest.json``: what the artifact is, read and checked without loading
its model (the server, export, the load test and the A/B config all read it this way)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ConfigDict, TypeAdapter, ValidationError, with_config

from recdistill.errors import ArtifactError
from recdistill.layout import ArtifactLayout

# 2: towers read pooled features by key, so int8 weights of format 1 (whose first layer
# was permuted to torchrec's int8 feature order) no longer fit.
# 3: the feature snapshot holds the validation split, the newest item of served histories.
FORMAT = 3
TWO_TOWER = "two_tower"
POPULARITY = "popularity"
EASE = "ease"
ENSEMBLE = "ensemble"
# A teacher from outside the run (its torch module or ONNX graph, recdistill.external).
EXTERNAL = "external"


@with_config(ConfigDict(extra="forbid"))
@dataclass(frozen=True, kw_only=True)
class Manifest:
    """``manifest.json``: what the artifact is and the SHA-256 of each of its files;
    ``version`` hashes those hashes. ``role`` is the model's role in the run it was exported
    from (``reference``, ``student`` or ``scratch``; None for the others)."""

    format: int
    name: str
    kind: str
    version: str
    params: int
    quantization: dict[str, bool] | None = None
    files: dict[str, str]
    exported_from: dict[str, str] = field(default_factory=dict)
    offline_metrics: dict[str, float] = field(default_factory=dict)
    role: str | None = None


def read_manifest(directory: Path) -> Manifest:
    """The artifact's ``manifest.json``, checked, read without loading the model."""
    path = ArtifactLayout(Path(directory)).manifest
    if not Path(directory).is_dir():
        raise ArtifactError(f"artifact {directory} not found")
    if not path.is_file():
        raise ArtifactError(
            f"{directory} is not an artifact: {path.name} is missing "
            "(create one with `recdistill export`)"
        )
    try:
        manifest = TypeAdapter(Manifest).validate_python(json.loads(path.read_text()))
    except json.JSONDecodeError as error:
        raise ArtifactError(f"{path} is not valid JSON: {error}") from error
    except ValidationError as error:
        raise ArtifactError(f"{path}: {error}") from error
    if manifest.format != FORMAT:
        raise ArtifactError(f"{path}: format {manifest.format}, this version reads {FORMAT}")
    if manifest.kind not in (TWO_TOWER, POPULARITY, EASE, ENSEMBLE, EXTERNAL):
        raise ArtifactError(f"{path}: unknown kind {manifest.kind!r}")
    return manifest
