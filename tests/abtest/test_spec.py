from pathlib import Path

import pytest

from recdistill.abtest.experiment import load_rankers
from recdistill.cli import main
from recdistill.config import load_experiment, load_routing
from recdistill.server import ServerSettings, routing_for
from tests.conftest import ab_table

PROJECT = Path(__file__).resolve().parents[2]

CONFIG = (
    ab_table("s", control=("popularity", 0.5), student=("student", 0.5))
    + """
[artifacts]
popularity = "{popularity}"
student = "{student}"

[analysis]
ship = ["student", "control"]

[simulation]
data = "{data}"
"""
)


def write(tmp_path: Path, text: str, **paths) -> Path:
    path = tmp_path / "ab.toml"
    values = {"popularity": "a/popularity", "student": "a/student", "data": "d"} | paths
    path.write_text(text.format(**{k: str(v) for k, v in values.items()}))
    return path


def test_the_default_config_parses_and_routes_the_server():
    config = PROJECT / "configs" / "ab.toml"
    experiment = load_experiment(config)
    assert [arm.name for arm in experiment.routing.arms] == ["control", "teacher", "student"]
    assert experiment.comparisons == [
        ("teacher", "control"),
        ("student", "control"),
        ("student", "teacher"),
    ]
    settings = ServerSettings(artifacts=(), ab_config=str(config))
    assert routing_for(settings, {"popularity", "teacher", "best"}) == experiment.routing
    assert load_routing(config) == experiment.routing


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t + "days_run = 3\n", "[simulation]: unknown key(s) ['days_run']"),
        (
            lambda t: t.replace("[analysis]", "[analysis]\nmargins = 0.1"),
            "unknown key(s) ['margins']",
        ),
        (lambda t: t + "[clickz]\n", "unknown table(s) ['clickz']"),
        (lambda t: t.replace("share = 0.5\n", "share = 0.6\n", 1), "shares add up to 1.1, not 1"),
        (lambda t: t.replace('student = "{student}"\n', ""), "arm 'student' serves model"),
        (lambda t: t.replace('data = "{data}"\n', ""), "[simulation] needs `data`"),
        (lambda t: t + "mode = 'live'\n", "mode must be one of ['offline', 'online']"),
        (lambda t: t.replace("[analysis]", "[analysis]\ncontrol = 'base'"), "control arm 'base'"),
        (lambda t: t.replace('"control"]', '"teacher"]'), "ship arm 'teacher' is not an arm"),
    ],
)
def test_config_errors_are_clear(tmp_path, capsys, edit, message):
    path = write(tmp_path, edit(CONFIG))
    with pytest.raises(ValueError) as error:
        load_experiment(path)
    assert message in str(error.value)
    assert main(["abtest", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_artifact_must_hold_the_model_its_name_says(tmp_path, tiny_artifacts, synthetic_dir):
    swapped = {"popularity": tiny_artifacts["popularity"], "student": tiny_artifacts["teacher"]}
    experiment = load_experiment(write(tmp_path, CONFIG, data=synthetic_dir, **swapped))
    with pytest.raises(ValueError, match="holds the model 'teacher'"):
        load_rankers(experiment)


def test_without_a_ship_pair_the_student_is_judged_against_the_reference_teacher(
    tmp_path, tiny_artifacts, synthetic_dir
):
    arms = ab_table("s", control=("popularity", 0.4), fast=("student", 0.3), big=("teacher", 0.3))
    listed = "\n".join(
        f'{name} = "{tiny_artifacts[name]}"' for name in ("popularity", "student", "teacher")
    )
    path = tmp_path / "ab.toml"
    path.write_text(f'{arms}\n[artifacts]\n{listed}\n\n[simulation]\ndata = "{synthetic_dir}"\n')
    assert load_experiment(path).analysis.ship == ("fast", "big")
    without_teacher = ab_table("s", control=("popularity", 0.5), fast=("student", 0.5))
    path.write_text(path.read_text().replace(arms, without_teacher))
    with pytest.raises(ValueError, match=r"set \[analysis\] ship"):
        load_experiment(path)


def test_an_interleaving_experiment_compares_its_two_arms_without_a_control(tmp_path):
    text = CONFIG.replace('salt = "s"', 'salt = "s"\ndesign = "interleaving"')
    text = text.replace("share = 0.5\n", "")
    experiment = load_experiment(write(tmp_path, text))
    assert experiment.routing.interleaved and experiment.pre_days == 0
    assert experiment.comparisons == [("student", "control")]


def test_a_live_analysis_needs_only_the_arms_and_the_ship_pair(tmp_path):
    path = tmp_path / "live.toml"
    path.write_text(ab_table("s", a=("teacher", 0.5), b=("student", 0.5)))
    with pytest.raises(ValueError, match=r"set \[analysis\] ship"):
        load_experiment(path, live=True)
    path.write_text(path.read_text() + '[analysis]\nship = ["b", "a"]\ncontrol = "a"\n')
    assert load_experiment(path, live=True).analysis.ship == ("b", "a")
    with pytest.raises(ValueError, match=r"which \[artifacts\] does not list"):
        load_experiment(path)  # a simulation needs the artifacts


def test_abtest_without_a_config_says_what_it_needs(capsys):
    assert main(["abtest"]) == 2
    assert "abtest needs --config and --out" in capsys.readouterr().err


def test_the_interleaving_config_parses_and_routes_the_server():
    config = PROJECT / "configs" / "ab_interleaving.toml"
    experiment = load_experiment(config)
    assert experiment.routing.interleaved and experiment.comparisons == [("student", "teacher")]
    settings = ServerSettings(artifacts=(), ab_config=str(config))
    models = {arm.model for arm in experiment.routing.arms}
    assert routing_for(settings, models) == experiment.routing
