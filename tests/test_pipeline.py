import json
import math
import re

import pyarrow.parquet as pq
import pytest

from recdistill.cli import main
from recdistill.config import load_run_config, parse_run_config
from recdistill.losses import LOSSES
from recdistill.pipeline import run
from recdistill.trainer import Trainer
from tests.conftest import ONE_STAGE, TINY

MODELS = [
    "teacher",
    "intermediate",
    "student",
    "student_scratch",
    "student_direct",
    "popularity",
    "ease",
    "ease_recency",
]


def test_summary_holds_every_model_with_the_contracted_fields(tiny_run):
    _, out = tiny_run
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["models"]) == MODELS
    for name, entry in summary["models"].items():
        assert isinstance(entry["params"], int)
        for metric in ("ndcg@10", "hr@10", "mrr", "full_ndcg@10", "full_recall@10"):
            assert 0.0 <= entry["metrics"][metric] <= 1.0, (name, metric)
    student = summary["models"]["student"]
    assert student["training"]["teachers"] == ["intermediate", "teacher"]
    assert student["training"]["epochs_run"] == 1
    assert summary["models"]["ease"]["l2"] in (50.0, 500.0)
    recency = summary["models"]["ease_recency"]
    assert recency["l2"] == summary["models"]["ease"]["l2"] and recency["half_life"] in (2.0, 20.0)
    assert recency["params"] == summary["models"]["ease"]["params"]
    assert {"teacher_vs_ease_recency", "student_vs_ease_recency"} <= set(summary["comparisons"])
    assert "student_vs_student_scratch" in summary["comparisons"]
    per_user = pq.read_table(out / "per_user.parquet").to_pandas()
    assert sorted(per_user["model"].unique()) == sorted(MODELS)
    means = per_user.groupby("model")["ndcg@10"].mean()
    assert means["teacher"] == pytest.approx(summary["models"]["teacher"]["metrics"]["ndcg@10"])


def test_a_finished_run_is_not_overwritten_without_resume(tiny_run, synthetic_dir, capsys):
    config, out = tiny_run
    before = (out / "summary.json").read_text()
    assert (
        main(["train", "--config", str(config), "--data", str(synthetic_dir), "--out", str(out)])
        == 2
    )
    assert "--resume" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--data",
                str(synthetic_dir),
                "--out",
                str(out),
                "--resume",
            ]
        )
        == 0
    )
    assert (
        json.loads((out / "summary.json").read_text())["models"]["student"]["metrics"]
        == (json.loads(before)["models"]["student"]["metrics"])
    )


def test_a_bad_data_directory_leaves_no_run_behind(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(TINY)
    command = ["train", "--config", str(config), "--data", str(tmp_path / "none")]
    assert main([*command, "--out", str(tmp_path / "out")]) == 2
    assert "not a recdistill data directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_stage_order_and_teachers_are_checked_before_training(synthetic_dir, tmp_path):
    with pytest.raises(ValueError, match="has no losses"):
        parse_run_config({"stages": {"a": {"model": "m"}}})
    with pytest.raises(ValueError, match=r"\[train\]: unknown key\(s\) \['learning_rat'\]"):
        parse_run_config({"train": {"learning_rat": 1.0}, "stages": {}})
    config = tmp_path / "c.toml"
    for broken, message in [
        ('source = "intermediate"', "learns from ['nobody']"),
        ('model = "big"', "unknown model preset 'huge'"),
    ]:
        config.write_text(
            TINY.replace(broken, broken.replace("intermediate", "nobody").replace("big", "huge"))
        )
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            run(load_run_config(config), synthetic_dir, tmp_path / "out")
        assert not list((tmp_path / "out").glob("*/log.jsonl"))


@pytest.mark.parametrize(
    "change, message",
    [
        (("heads = 2", "heads = 3"), "[models.big]: heads (3) must divide embedding_dim (16)"),
        (("max_length = 8", "max_length = 0"), "[models.big]: max_length must be at least 1"),
        (("max_length = 8", "max_length = 11"), "more than [train] history_length = 10"),
        (('user_encoder = "sequence"', 'user_encoder = "rnn"'), "unknown user_encoder 'rnn'"),
        (
            ("recent_length = 3", 'recent_length = 0\nuser_encoder = "sequence"\nheads = 8'),
            "[models.small]: a sequence encoder of embedding_dim 4 cannot have 8 heads",
        ),
        (('objective = "next_item"', 'objective = "pairs"'), "unknown objective 'pairs'"),
        (('model = "big"', 'model = "small"'), "next_item objective needs a sequence model"),
    ],
)
def test_bad_sequence_configs_stop_before_training(synthetic_dir, tmp_path, change, message):
    config = tmp_path / "c.toml"
    config.write_text(TINY.replace(*change, 1))
    with pytest.raises(ValueError, match=re.escape(message)):
        run(load_run_config(config), synthetic_dir, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*/log.jsonl"))


def test_a_diverged_stage_is_a_clear_error_and_resumes_at_a_lower_learning_rate(
    synthetic_dir, tmp_path, monkeypatch, capsys
):
    config = tmp_path / "c.toml"
    config.write_text(ONE_STAGE)
    out = tmp_path / "run"
    command = ["train", "--config", str(config), "--data", str(synthetic_dir), "--out", str(out)]
    # Once epoch 0 is checkpointed, the loss turns NaN.
    checkpointed, checkpoint, softmax_ce = False, Trainer._checkpoint, LOSSES["softmax_ce"]

    def checkpoint_and_remember(self, state):
        nonlocal checkpointed
        checkpoint(self, state)
        checkpointed = True

    def poisoned(student, target, *, mask):
        value = softmax_ce(student, target, mask=mask)
        return value * math.nan if checkpointed else value

    monkeypatch.setattr(Trainer, "_checkpoint", checkpoint_and_remember)
    monkeypatch.setitem(LOSSES, "softmax_ce", poisoned)
    assert main(command) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "recdistill: error: stage 'teacher' diverged at epoch 1, batch 0: loss is nan; the last "
        "good checkpoint (epoch 0) is kept: lower the learning rate and rerun with --resume"
    )
    assert not (out / "summary.json").exists()
    monkeypatch.undo()

    config.write_text(ONE_STAGE.replace("learning_rate = 5e-3", "learning_rate = 1e-3"))
    assert main([*command, "--resume"]) == 0
    assert "teacher: resuming after epoch 0 with learning_rate 0.001" in capsys.readouterr().err
    log = [json.loads(line) for line in (out / "teacher" / "log.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in log] == [0, 1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"]["teacher"]["training"]["epochs_run"] == 3
