"""Stage roles: derived from who learns from whom, so stage names are the user's own."""

import copy
import dataclasses
import json
import tomllib

import pytest

from recdistill.config import load_toml, parse_run_config
from recdistill.pipeline import run
from recdistill.roles import Roles
from tests.conftest import PROJECT

ML100K_CONFIG = PROJECT / "configs" / "ml100k.toml"
# Every stage and ensemble of configs/ml100k.toml under a name of the user's own.
NEW_NAMES = {
    "teacher": "ranker_big",
    "intermediate": "ranker_mid",
    "student": "ranker_small",
    "student_scratch": "ranker_small_labels",
    "teacher_mix": "big_with_ease",
}
# Measurements that depend on the machine, not on the names.
TIMINGS = ("train_seconds", "examples_per_second", "latency_ms")


def renamed(raw: dict, names: dict[str, str]) -> dict:
    """The config ``raw`` with its stages and ensembles (and every reference to them) renamed."""
    raw = copy.deepcopy(raw)
    for table in ("stages", "ensembles"):
        raw[table] = {names.get(name, name): body for name, body in raw[table].items()}
    for stage in raw["stages"].values():
        for term in stage["losses"]:
            term["source"] = names.get(term.get("source"), term.get("source", "labels"))
    for ensemble in raw["ensembles"].values():
        ensemble["members"] = [names.get(m, m) for m in ensemble["members"]]
    return raw


def small(raw: dict) -> dict:
    """``raw``'s stages, ensembles and losses on tiny bag models, one epoch each."""
    raw = copy.deepcopy(raw)
    raw["train"]["history_length"] = 10
    for model in raw["models"].values():
        model.clear()
        model |= {"embedding_dim": 8, "tower": [8], "feature_dim": 2}
    for stage in raw["stages"].values():
        for key in ("objective", "scored_items", "batch_size"):
            stage.pop(key, None)
        stage["epochs"] = 1
    return raw


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
    return value


def in_old_names(summary: dict, names: dict[str, str]) -> dict:
    back = {new: old for old, new in names.items()}

    def name(text: str) -> str:
        for new, old in sorted(back.items(), key=lambda item: -len(item[0])):
            text = text.replace(new, old)
        return text

    return json.loads(name(json.dumps(summary)))


def test_the_ml100k_roles_are_derived_from_its_teachers():
    roles = parse_run_config(load_toml(ML100K_CONFIG)).roles
    assert (roles.reference, roles.student, roles.scratch) == (
        "teacher",
        "student",
        "student_scratch",
    )
    assert roles.comparisons[:3] == (
        ("student", "teacher"),
        ("student", "student_scratch"),
        ("teacher", "student_scratch"),
    )
    assert ("student", "teacher_mix") in roles.comparisons
    renamed_roles = parse_run_config(renamed(load_toml(ML100K_CONFIG), NEW_NAMES)).roles
    assert renamed_roles == Roles(
        NEW_NAMES[roles.reference],
        NEW_NAMES[roles.student],
        NEW_NAMES[roles.scratch],
        tuple(tuple(NEW_NAMES.get(n, n) for n in pair) for pair in roles.comparisons),
    )


def test_roles_set_in_the_config_win_and_must_name_the_run_s_models():
    raw = load_toml(ML100K_CONFIG)
    chosen = parse_run_config({**raw, "roles": {"student": "intermediate"}}).roles
    assert chosen.student == "intermediate" and chosen.reference == "teacher"
    assert chosen.comparisons[0] == ("intermediate", "teacher")
    with pytest.raises(ValueError, match=r"\[roles\]: reference = 'nobody' is not a stage"):
        parse_run_config({**raw, "roles": {"reference": "nobody"}})
    with pytest.raises(ValueError, match=r"\[roles\]: comparisons are \[model, reference\]"):
        parse_run_config({**raw, "roles": {"comparisons": [["student", "nobody"]]}})


def test_a_config_is_written_back_to_toml_as_it_was_read():
    config = parse_run_config(load_toml(ML100K_CONFIG))
    assert parse_run_config(tomllib.loads(config.to_toml())) == config
    built = dataclasses.replace(config, stages=config.stages[:1], ensembles={}, roles=None)
    assert parse_run_config(tomllib.loads(built.to_toml())) == built


def test_renaming_every_stage_of_the_ml100k_config_gives_the_same_summary(synthetic_dir, tmp_path):
    raw = small(load_toml(ML100K_CONFIG))
    summaries = {}
    for label, names in (("as shipped", {}), ("renamed", NEW_NAMES)):
        config = parse_run_config(renamed(raw, names))
        summary = run(config, synthetic_dir, tmp_path / label)
        written = json.loads((tmp_path / label / "summary.json").read_text())
        assert list(written["models"])[:4] == [names.get(s, s) for s in raw["stages"]]
        summaries[label] = without_timings(in_old_names(written, names))
        assert summary.models.keys() == written["models"].keys()
    assert summaries["renamed"] == summaries["as shipped"]
    assert "student_vs_student_scratch" in summaries["renamed"]["comparisons"]
