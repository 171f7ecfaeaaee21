import importlib.util
import json
import os

import pytest
import torch

from recdistill import devices, distributed
from recdistill.cli import main
from tests.conftest import ONE_STAGE, PROJECT

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


@pytest.fixture(autouse=True)
def own_device_choice(monkeypatch):
    """Each test starts from the default choice and leaves its own behind."""
    monkeypatch.setenv(devices.DEVICE_ENV, "auto")


@pytest.fixture
def two_gpus(monkeypatch):
    """torch as it looks on a machine with two GPUs (nothing runs on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_auto_and_cpu_are_the_cpu_on_a_machine_without_a_gpu():
    assert devices.resolve("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert devices.resolve("auto").type == expected == devices.resolve().type


@NO_GPU
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_a_gpu_says_so(name):
    with pytest.raises(ValueError, match="this machine has no CUDA device .*use --device cpu"):
        devices.resolve(name)


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cuda:-1", "mps"])
def test_a_malformed_device_is_refused(name):
    with pytest.raises(ValueError, match=f"unknown device '{name}'"):
        devices.resolve(name)


def test_cuda_is_the_first_gpu_or_the_one_named(two_gpus):
    assert devices.resolve("auto") == torch.device("cuda", 0)
    assert devices.resolve("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="has 2 CUDA device.*cuda:0 to cuda:1"):
        devices.resolve("cuda:2")


def test_under_torchrun_each_rank_takes_its_own_gpu(two_gpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert devices.resolve("cuda") == devices.resolve("auto") == torch.device("cuda", 1)
    assert devices.resolve("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="each rank computes on its own GPU"):
        devices.resolve("cuda:0")


def test_the_choice_reaches_the_world_and_worker_processes():
    device = devices.use("cpu")
    assert os.environ[devices.DEVICE_ENV] == "cpu"
    assert distributed.world().device == device
    threads = torch.get_num_threads()
    assert devices.describe(device) == f"cpu ({threads} thread{'' if threads == 1 else 's'})"


def train_argv(config, data, out) -> list[str]:
    return ["train", "--config", str(config), "--data", str(data), "--out", str(out)]


@NO_GPU
def test_train_on_cuda_without_a_gpu_is_one_line_and_writes_nothing(
    synthetic_dir, tmp_path, capsys
):
    config = tmp_path / "one.toml"
    config.write_text(ONE_STAGE)
    status = main([*train_argv(config, synthetic_dir, tmp_path / "run"), "--device", "cuda"])
    error = capsys.readouterr().err
    assert status == 2
    assert error.startswith("recdistill: error: device 'cuda': this machine has no CUDA")
    assert error.count("\n") == 1 and "Traceback" not in error
    assert not (tmp_path / "run").exists()


def test_a_tiny_run_honours_device_cpu(tiny_run):
    """The tiny run was trained with --device cpu: its models, frozen teachers, training
    batches and scored batches were all on the CPU, and it said so as it started."""
    directory = tiny_run[1].parent
    assert json.loads((directory / "devices.json").read_text()) == [
        "batch cpu",
        "model cpu",
        "scored cpu",
        "teacher cpu",
    ]
    assert (
        (directory / "stderr.txt")
        .read_text()
        .startswith(f"device: {devices.describe(torch.device('cpu'))}\n")
    )


@NO_GPU
def test_device_cpu_wins_over_the_environment_and_the_environment_is_read(
    synthetic_dir, tmp_path, capsys, monkeypatch
):
    config = tmp_path / "one.toml"
    config.write_text(ONE_STAGE)
    monkeypatch.setenv(devices.DEVICE_ENV, "cuda")
    argv = train_argv(config, synthetic_dir, tmp_path / "run")
    assert main(argv) == 2
    assert "device 'cuda': this machine has no CUDA" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert devices.use("cpu") == torch.device("cpu")
    assert os.environ[devices.DEVICE_ENV] == "cpu"


def test_device_check_runs_here_with_the_gpus_it_lacks_marked(capsys):
    """benchmarks/device_check.py on a small world: every table has the CPU's numbers, and a
    device torch cannot see is a row marked unavailable, not a failure."""
    path = PROJECT / "benchmarks" / "device_check.py"
    spec = importlib.util.spec_from_file_location("device_check", path)
    device_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(device_check)
    argv = ["--check-users", "150", "--epochs", "1", "--users", "150", "--batches", "1"]
    assert device_check.main(argv) == 0
    printed = capsys.readouterr().out
    tables = [part for part in printed.split("\n\n") if part.startswith("| device")]
    assert len(tables) == 3
    for table in tables:
        rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
        assert "unavailable" not in rows["cpu"] and rows["cpu"].count("|") >= 4
        if not torch.cuda.is_available():
            assert rows["cuda"].count("unavailable") == rows["cpu"].count("|") - 2
