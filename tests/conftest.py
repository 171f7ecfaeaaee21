from pathlib import Path

import pytest

from recdistill.data.prepare import SplitSpec, prepare
from recdistill.data.synthetic import SyntheticSpec, generate

PROJECT = Path(__file__).resolve().parents[1]
ML100K = PROJECT.parent / "shared" / "datasets" / "ml-100k"

SMALL_WORLD = SyntheticSpec(users=400, items=500, mean_activity=25.0, seed=3)


def build_synthetic(directory: Path, spec: SyntheticSpec = SMALL_WORLD) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    generate(spec, directory)
    prepare(directory, SplitSpec(seed=spec.seed))
    return directory


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small prepared synthetic world, shared read-only by the tests."""
    return build_synthetic(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture
def ml100k() -> Path:
    if not (ML100K / "u.data").exists():
        pytest.skip(f"MovieLens 100K not found at {ML100K}")
    return ML100K


@pytest.fixture(scope="session")
def tiny_run(synthetic_dir, tmp_path_factory):
    """A full `recdistill train` run with tiny models on the small synthetic world."""
    from recdistill.cli import main
    from tests.test_pipeline import TINY

    directory = tmp_path_factory.mktemp("run")
    config = directory / "tiny.toml"
    config.write_text(TINY)
    out = directory / "run"
    command = ["train", "--config", str(config), "--data", str(synthetic_dir), "--out", str(out)]
    assert main(command) == 0
    return config, out
