"""A config is checked by name, type and range as it is read: every error is one line that
names the table and the key."""

from pathlib import Path

import pytest

from recdistill.cli import main
from recdistill.config import assignments, load_run_config, load_sweep_config

STAGE = (
    '[models.teacher]\nembedding_dim = 8\n[stages.teacher]\nmodel = "teacher"\n'
    'losses = [{ fn = "softmax_ce" }]\n'
)


def _error(tmp_path: Path, text: str, load=load_run_config) -> str:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        load(path)
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[train]\nepochs = 2.5", "[train] epochs = 2.5: expected an integer, not float"),
        ('[train]\nbatch_size = "512"', "[train] batch_size = '512': expected an integer"),
        ('[train]\nepochs = "three"', "[train] epochs = 'three': expected an integer"),
        ("[train]\nlearning_rate = true", "[train] learning_rate = True: expected a number"),
        ("[models.teacher]\nembedding_dim = 1.5", "[models.teacher] embedding_dim = 1.5"),
        ('[data.split]\nseed = "0"', "[data.split] seed = '0': expected an integer"),
        ("[models.teacher]\ntower = 64", "[models.teacher] tower = 64: expected an array"),
        (STAGE + "epochs = 2.5", "[stages.teacher] epochs = 2.5: expected an integer"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_naming_its_table_and_key(tmp_path, text, expected):
    assert expected in _error(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[train]\nepochs = 0", "[train] epochs = 0: must be at least 1"),
        ("[train]\nlearning_rate = -1", "[train] learning_rate = -1: must be above 0"),
        ("[train]\nbatch_size = 0", "[train] batch_size = 0: must be at least 1"),
        (STAGE + "patience = -1", "[stages.teacher] patience = -1: must be at least 0"),
    ],
)
def test_a_value_out_of_range_is_refused_naming_its_table_and_key(tmp_path, text, expected):
    assert expected in _error(tmp_path, text)


def test_an_unknown_key_is_refused_with_the_valid_ones(tmp_path):
    message = _error(tmp_path, "[train]\nepoch = 3")
    assert message.startswith("[train]: unknown key(s) ['epoch']; valid keys are")


def test_a_number_where_a_float_is_asked_for_and_arrays_of_numbers_are_accepted(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[train]\nlearning_rate = 1\n[baselines.ease]\nl2 = [100, 300.0]\n")
    assert load_run_config(path).train.stage.learning_rate == 1


def test_every_shipped_config_passes_the_checks():
    project = Path(__file__).resolve().parents[1]
    for path in sorted((project / "configs").glob("*.toml")):
        if path.name.startswith("sweep"):
            load_sweep_config(path)
        elif not path.name.startswith("ab"):
            load_run_config(path)
    for path in sorted((project / "examples").rglob("*.toml")):
        load_run_config(path)


def test_set_changes_values_of_the_config_and_checks_them(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(STAGE)
    changes = assignments(
        ["stages.teacher.epochs=5", "train.seed=1", "stages.teacher.schedule=cosine"]
    )
    assert changes == {
        "stages": {"teacher": {"epochs": 5, "schedule": "cosine"}},
        "train": {"seed": 1},
    }
    config = load_run_config(path, changes)
    assert config.stage("teacher").epochs == 5 and config.stage("teacher").schedule == "cosine"
    assert config.train.stage.seed == 1
    assert "[stages.teacher] epochs = 0: must be at least 1" in _error(
        tmp_path, STAGE, lambda p: load_run_config(p, assignments(["stages.teacher.epochs=0"]))
    )
    with pytest.raises(ValueError, match=r"expected TABLE\.KEY=VALUE"):
        assignments(["epochs"])


def test_train_takes_set_on_the_command_line_and_refuses_a_bad_value(tmp_path, capsys):
    path = tmp_path / "config.toml"
    path.write_text(STAGE)
    argv = [
        "train",
        "--config",
        str(path),
        "--data",
        str(tmp_path / "none"),
        "--out",
        str(tmp_path / "run"),
    ]
    assert main([*argv, "--set", "train.epochs=three"]) == 2
    assert "[train] epochs = 'three': expected an integer, not str" in capsys.readouterr().err
    assert main([*argv, "--set", "train.epoch=3"]) == 2
    assert "[train]: unknown key(s) ['epoch']" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
