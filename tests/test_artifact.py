import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from recdistill.artifact import _sha256, _version, export_artifact, load_artifact
from recdistill.cli import main
from recdistill.errors import ArtifactError
from recdistill.layout import MANIFEST, WEIGHTS


def test_every_served_kind_exports_and_loads(tiny_artifacts, tiny_run):
    _, run = tiny_run
    summary = json.loads((run / "summary.json").read_text())
    for name, directory in tiny_artifacts.items():
        artifact = load_artifact(directory)
        manifest = json.loads((directory / MANIFEST).read_text())
        assert artifact.name == name
        assert artifact.version == manifest["version"]
        assert artifact.params == summary["models"][name]["params"]
        assert set(manifest["files"]) >= {
            WEIGHTS,
            "spec.json",
            "vocabularies.json",
            "features/users.parquet",
            "features/items.parquet",
            "features/train.parquet",
        }
        assert artifact.kind == ("popularity" if name == "popularity" else "two_tower")
        assert (artifact.model is None) == (name == "popularity")


def test_artifacts_hold_no_pickle(tiny_artifacts):
    for directory in tiny_artifacts.values():
        for path in directory.rglob("*"):
            if path.is_file():
                assert path.suffix in {".json", ".parquet", ".safetensors"}, path
                assert not path.read_bytes().startswith(b"\x80"), f"{path} looks like a pickle"


def test_the_version_is_a_content_hash(tiny_run, tmp_path):
    _, run = tiny_run
    first = export_artifact(run, "student", tmp_path / "a")
    second = export_artifact(run, "student", tmp_path / "b")
    other = export_artifact(run, "intermediate", tmp_path / "c")
    assert first.version == second.version != other.version
    assert first.version == _version(first.files)


def test_loaded_weights_are_the_trained_ones(tiny_artifacts, tiny_run):
    _, run = tiny_run
    artifact = load_artifact(tiny_artifacts["student"])
    trained = load_file(run / "student" / WEIGHTS)
    for key, value in artifact.model.state_dict().items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=0)


@pytest.fixture
def student_copy(tiny_artifacts, tmp_path):
    directory = tmp_path / "student"
    shutil.copytree(tiny_artifacts["student"], directory)
    return directory


def _rewrite_manifest(directory, **changes):
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest.update(changes)
    (directory / MANIFEST).write_text(json.dumps(manifest))
    return manifest


def _refresh_hashes(directory):
    manifest = json.loads((directory / MANIFEST).read_text())
    files = {name: _sha256(directory / name) for name in manifest["files"]}
    _rewrite_manifest(directory, files=files, version=_version(files))


def test_a_corrupt_file_is_refused_by_its_hash(student_copy):
    weights = student_copy / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupt: model.safetensors has SHA-256"):
        load_artifact(student_copy)


def test_a_missing_file_is_named(student_copy):
    (student_copy / "features" / "items.parquet").unlink()
    with pytest.raises(ArtifactError, match="features/items.parquet is missing"):
        load_artifact(student_copy)


def test_weights_of_another_architecture_are_refused(student_copy, tiny_run):
    _, run = tiny_run
    save_file(load_file(run / "teacher" / WEIGHTS), student_copy / WEIGHTS)
    _refresh_hashes(student_copy)
    with pytest.raises(ArtifactError, match="weights do not fit the spec"):
        load_artifact(student_copy)


def test_a_tensor_of_the_wrong_shape_is_named(student_copy):
    weights = load_file(student_copy / WEIGHTS)
    weights["item_bias.weight"] = torch.zeros(3, 1)
    save_file(weights, student_copy / WEIGHTS)
    _refresh_hashes(student_copy)
    with pytest.raises(ArtifactError, match=r"item_bias.weight has shape \(3, 1\)"):
        load_artifact(student_copy)


def test_truncated_weights_are_refused(student_copy):
    (student_copy / WEIGHTS).write_bytes(b"not a safetensors file")
    _refresh_hashes(student_copy)
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        load_artifact(student_copy)


def test_vocabularies_that_disagree_with_the_snapshot_are_refused(student_copy):
    path = student_copy / "vocabularies.json"
    vocabularies = json.loads(path.read_text())
    vocabularies["item_id"] = vocabularies["item_id"][:-1]
    path.write_text(json.dumps(vocabularies))
    _refresh_hashes(student_copy)
    with pytest.raises(ArtifactError, match="vocabularies.json does not match"):
        load_artifact(student_copy)


def test_a_manifest_version_that_is_not_the_content_hash_is_refused(student_copy):
    _rewrite_manifest(student_copy, version="0" * 16)
    with pytest.raises(ArtifactError, match="version does not match"):
        load_artifact(student_copy)


def test_a_directory_without_manifest_is_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="not an artifact: manifest.json is missing"):
        load_artifact(tmp_path)


def test_unknown_format_is_refused(student_copy):
    _rewrite_manifest(student_copy, format=99)
    with pytest.raises(ArtifactError, match="format 99"):
        load_artifact(student_copy)


def test_export_names_what_can_be_exported(tiny_run, tmp_path, capsys):
    _, run = tiny_run
    command = ["export", "--run", str(run), "--model", "nobody", "--out", str(tmp_path / "x")]
    assert main(command) == 2
    error = capsys.readouterr().err
    assert "cannot export 'nobody'" in error and "'student'" in error and "'popularity'" in error
    command[command.index("nobody")] = "ease"  # a baseline is served only inside an ensemble
    assert main(command) == 2
    assert "cannot export 'ease'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_export_cli_reports_the_version(tiny_run, tmp_path, capsys):
    _, run = tiny_run
    out = tmp_path / "student"
    assert main(["export", "--run", str(run), "--model", "student", "--out", str(out)]) == 0
    version = json.loads((out / MANIFEST).read_text())["version"]
    assert f"version {version}" in capsys.readouterr().out


def test_export_of_a_directory_that_is_not_a_run_fails_clearly(tmp_path, capsys):
    command = ["export", "--run", str(tmp_path), "--model", "student", "--out", str(tmp_path / "x")]
    assert main(command) == 2
    assert "summary.json not found" in capsys.readouterr().err


def _spoil(weights_path):
    """Three non-finite values in the first floating-point tensor; returns its name."""
    weights = load_file(weights_path)
    key = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() >= 3)
    flat = weights[key].view(-1)
    flat[0], flat[1], flat[2] = float("nan"), float("inf"), float("-inf")
    save_file(weights, weights_path)
    return key


def test_non_finite_weights_are_refused_on_load_by_name(student_copy):
    key = _spoil(student_copy / WEIGHTS)
    _refresh_hashes(student_copy)
    with pytest.raises(ArtifactError) as refused:
        load_artifact(student_copy)
    assert str(refused.value) == f"artifact {student_copy}: tensor {key!r} has 3 non-finite values"


def test_non_finite_weights_are_refused_on_export_by_name(tiny_run, tmp_path):
    _, run = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights = copy / "student" / WEIGHTS
    key = _spoil(weights)
    with pytest.raises(ArtifactError) as refused:
        export_artifact(copy, "student", tmp_path / "student")
    assert str(refused.value) == (
        f"cannot export 'student' from {weights}: tensor {key!r} has 3 non-finite values"
    )
    assert not (tmp_path / "student").exists()
