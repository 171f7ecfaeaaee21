import doctest
import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from recdistill.config import load_run_config
from recdistill.data.prepare import SplitSpec, prepare
from recdistill.data.synthetic import SyntheticSpec, generate
from recdistill.layout import RunLayout
from recdistill.quantize import QuantizationSpec
from recdistill.recipe import StageRecord, write_record
from recdistill.summary import (
    ChosenModel,
    ClockLatency,
    Latency,
    SegmentScore,
    Selection,
    SweepSummary,
    ValidScore,
    write_summary,
)

PROJECT = Path(__file__).resolve().parents[1]
ML100K = PROJECT.parent / "shared" / "datasets" / "ml-100k"

# Tiny models and schedules: a whole `recdistill train` run in seconds.
TINY = """
[models.big]
embedding_dim = 16
tower = [32, 8]
feature_dim = 4
user_encoder = "sequence"
max_length = 8
layers = 1
heads = 2

[models.small]
embedding_dim = 4
tower = [8]
feature_dim = 2
recent_length = 3

[train]
history_length = 10
batch_size = 512
negatives = 4
epochs = 2
patience = 2
learning_rate = 5e-3

[baselines.ease]
l2 = [50.0, 500.0]

[baselines.ease_recency]
half_life = [2.0, 20.0]

[stages.teacher]
model = "big"
objective = "next_item"
batch_size = 64
negatives = 16
losses = [{ fn = "softmax_ce" }]

[stages.intermediate]
model = "small"
losses = [{ fn = "listnet", source = "teacher", temperature = 2.0 }]

[stages.student]
model = "small"
epochs = 1
lists = { depth = 50, top = 10, uniform = 10 }
losses = [
    { fn = "softmax_ce" },
    { fn = "ranknet", source = "intermediate", weight = 0.5 },
    { fn = "feature_mse", source = "teacher", weight = 0.1 },
]

[stages.student_scratch]
model = "small"
losses = [{ fn = "softmax_ce" }]

[stages.student_direct]
model = "small"
losses = [{ fn = "margin_mse", source = "teacher" }]
"""


# One stage, the teacher on labels, then the baselines: for runs whose training is the point.
# Its 16-wide tables are sharded two ways under torchrun.
ONE_STAGE = """
[models.big]
embedding_dim = 16
tower = [32, 8]
feature_dim = 4

[train]
history_length = 10
batch_size = 256
negatives = 4
epochs = 3
patience = 3
learning_rate = 5e-3

[baselines.ease]
l2 = [50.0]

[baselines.ease_recency]
half_life = [2.0]

[stages.teacher]
model = "big"
losses = [{ fn = "softmax_ce" }]
"""


def run_docstring_example(obj) -> None:
    """Run the examples of ``obj``'s own docstring (not its members') as a doctest."""
    tests = doctest.DocTestFinder(recurse=False).find(obj)
    assert tests and tests[0].examples, f"{obj.__qualname__} has no docstring example"
    report: list[str] = []
    runner = doctest.DocTestRunner()
    runner.run(tests[0], out=report.append)
    assert runner.failures == 0, "".join(report)


def ab_table(salt: str, **arms: tuple[str, float]) -> str:
    """An ``[ab]`` config table (TOML) routing users to ``arms``: name = (model, share)."""
    lines = ["[ab]", f'salt = "{salt}"']
    for name, (model, share) in arms.items():
        lines += [f"[ab.arms.{name}]", f'model = "{model}"', f"share = {share}"]
    return "\n".join(lines) + "\n"


SMALL_WORLD = SyntheticSpec(users=400, items=500, mean_activity=25.0, seed=3)


def build_synthetic(directory: Path, spec: SyntheticSpec = SMALL_WORLD) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    generate(spec, directory)
    prepare(directory, SplitSpec(seed=spec.seed))
    return directory


def write_sweep_summary(
    run: Path, data: Path, models: dict[str, tuple[str, int, QuantizationSpec | None]]
) -> None:
    """``run``'s summary as ``recdistill sweep`` writes it, with ``models`` (name: preset of
    ``run``'s config, parameter count, quantization) chosen and every measurement zero, and
    each model's stage record."""
    latency = ClockLatency(0.0, Latency(0.0, 0.0), Latency(0.0, 0.0))
    segment = SegmentScore("all", "all", 0, 0.0, 0.0, 0.0, [0.0, 0.0])
    chosen = {
        name: ChosenModel(
            preset, name, params, quantization, 0, latency, ValidScore(0.0, segment), {}
        )
        for name, (preset, params, quantization) in models.items()
    }
    selection = Selection(chosen=None, frontier=[], within_budget=[])
    summary = SweepSummary(str(data), "synthetic", "", "grid", 0, selection, chosen, {})
    layout = RunLayout(run)
    write_summary(layout.summary, summary)
    config = load_run_config(layout.config)
    for name, (preset, _, quantization) in models.items():
        stage = layout.stage(name)
        stage.root.mkdir(exist_ok=True)
        record = StageRecord(preset, config.models[preset], config.history_length, quantization)
        write_record(stage, record)


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
def ml100k_dir(tmp_path_factory) -> Path:
    """MovieLens 100K as ``recdistill data movielens`` prepares it, shared read-only."""
    from recdistill.cli import main

    if not (ML100K / "u.data").exists():
        pytest.skip(f"MovieLens 100K not found at {ML100K}")
    directory = tmp_path_factory.mktemp("ml100k") / "data"
    assert main(["data", "movielens", "--path", str(ML100K), "--out", str(directory)]) == 0
    return directory


@pytest.fixture(scope="session")
def tiny_run(synthetic_dir, tmp_path_factory):
    """A full `recdistill train --device cpu` run with tiny models on the small synthetic
    world. Beside the run directory it leaves what the command printed (``stdout.txt``,
    ``stderr.txt``) and the devices its models, teachers and batches were on
    (``devices.json``, :func:`watch_devices`)."""
    from recdistill.cli import main

    directory = tmp_path_factory.mktemp("run")
    config = directory / "tiny.toml"
    config.write_text(TINY)
    out = directory / "run"
    command = ["train", "--config", str(config), "--data", str(synthetic_dir), "--out", str(out)]
    printed, errors = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(printed), redirect_stderr(errors):
        seen = watch_devices(patch)
        status = main([*command, "--device", "cpu"])
    (directory / "stdout.txt").write_text(printed.getvalue())
    (directory / "stderr.txt").write_text(errors.getvalue())
    (directory / "devices.json").write_text(json.dumps(sorted(seen)))
    assert status == 0, errors.getvalue()
    return config, out


def watch_devices(patch: pytest.MonkeyPatch) -> set[str]:
    """The devices training batches, trained models, frozen teachers and scored batches are
    on from now on (``"batch cpu"``, ``"model cpu"``, ...), filled in as they are used."""
    from recdistill import evaluate
    from recdistill.objective import StageObjective
    from recdistill.teachers import FrozenTeacher

    seen: set[str] = set()
    forward, teacher_init = StageObjective.forward, FrozenTeacher.__init__
    device_of = evaluate.device_of

    def forward_spy(self, batch, *answers):
        seen.add(f"batch {batch.users.values().device.type}")
        seen.add(f"model {next(self.parameters()).device.type}")
        return forward(self, batch, *answers)

    def teacher_spy(self, name, model, store, **options):
        teacher_init(self, name, model, store, **options)
        seen.add(f"teacher {self.items.device.type}")

    def scored_spy(ranker):
        seen.add(f"scored {device_of(ranker).type}")
        return device_of(ranker)

    patch.setattr(StageObjective, "forward", forward_spy)
    patch.setattr(FrozenTeacher, "__init__", teacher_spy)
    patch.setattr(evaluate, "device_of", scored_spy)
    return seen


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_run, tmp_path_factory) -> dict[str, Path]:
    """Serving artifacts of the tiny run's teacher, intermediate, student and popularity."""
    from recdistill.artifact import export_artifact

    _, run = tiny_run
    directory = tmp_path_factory.mktemp("artifacts")
    names = ("teacher", "intermediate", "student", "popularity")
    for name in names:
        export_artifact(run, name, directory / name)
    return {name: directory / name for name in names}
