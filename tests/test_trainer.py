import json
import math

import pytest
import torch
from safetensors.torch import load_file

from recdistill.checkpoint import load_checkpoint, save_checkpoint
from recdistill.data.batches import FeatureStore
from recdistill.errors import TrainingDiverged
from recdistill.losses import LOSSES
from recdistill.models import FeatureSpace, TwoTower, TwoTowerSpec
from recdistill.stage import LossTerm, StageSpec
from recdistill.teachers import FrozenTeacher
from recdistill.trainer import EpochStats, StageResult, Trainer, TrainState, duration

SMALL = TwoTowerSpec(embedding_dim=8, tower=(8,), feature_dim=2, dropout=0.2)


@pytest.fixture(scope="module")
def store(synthetic_dir):
    return FeatureStore(synthetic_dir, history_length=10)


def fresh_model(store, seed=0, spec=SMALL):
    torch.manual_seed(seed)
    return TwoTower(spec, FeatureSpace.of(store))


def stage(**overrides):
    values = {
        "name": "s",
        "model": "small",
        "losses": (LossTerm("softmax_ce"),),
        "epochs": 3,
        "patience": 5,
        "batch_size": 256,
        "negatives": 4,
        "learning_rate": 5e-3,
    }
    return StageSpec(**{**values, **overrides})


def log_of(directory):
    return [json.loads(line) for line in (directory / "log.jsonl").read_text().splitlines()]


def test_training_improves_validation_and_logs_every_epoch(store, tmp_path):
    model = fresh_model(store)
    result = Trainer(stage(), model, {}, store, tmp_path).fit()
    log = log_of(tmp_path)
    assert [r["epoch"] for r in log] == [0, 1, 2]
    assert result.best_valid == max(r["valid_ndcg@10"] for r in log)
    assert result.valid == {
        name: log[result.best_epoch][f"valid_{name}"] for name in ("ndcg@10", "full_ndcg@10")
    }
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert result.best_valid > 0.2  # random ranking of 1 + 99 gives about 0.05
    best = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(best[k], v) for k, v in model.state_dict().items())


def test_early_stopping_follows_the_stages_validation_metric(store, tmp_path):
    model = fresh_model(store)
    result = Trainer(stage(valid_metric="full_ndcg@10"), model, {}, store, tmp_path).fit()
    log = log_of(tmp_path)
    assert result.best_valid == max(r["valid_full_ndcg@10"] for r in log)
    assert log[result.best_epoch]["best"]
    with pytest.raises(ValueError, match="unknown valid_metric 'mrr'"):
        stage(valid_metric="mrr")


def test_resume_after_interruption_reaches_the_identical_result(store, tmp_path, monkeypatch):
    spec = stage(
        losses=(LossTerm("softmax_ce"), LossTerm("listnet", "teacher", 1.0, {"temperature": 2.0}))
    )
    teacher = FrozenTeacher("teacher", fresh_model(store, seed=7), store)
    straight = fresh_model(store)
    Trainer(spec, straight, {"teacher": teacher}, store, tmp_path / "straight").fit()

    saves = 0
    original = Trainer._checkpoint

    def crash_after_two(self, state):
        nonlocal saves
        original(self, state)
        saves += 1
        if saves == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_checkpoint", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        Trainer(spec, fresh_model(store), {"teacher": teacher}, store, tmp_path / "cut").fit()
    monkeypatch.setattr(Trainer, "_checkpoint", original)
    assert len(log_of(tmp_path / "cut")) == 2

    resumed = fresh_model(store, seed=99)  # different init: the checkpoint must win
    Trainer(spec, resumed, {"teacher": teacher}, store, tmp_path / "cut").fit(resume=True)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    drop_timing = [
        {k: v for k, v in r.items() if k not in ("seconds", "examples_per_second")}
        for r in log_of(tmp_path / "straight")
    ]
    assert drop_timing == [
        {k: v for k, v in r.items() if k not in ("seconds", "examples_per_second")}
        for r in log_of(tmp_path / "cut")
    ]


def test_early_stopping_and_frozen_teacher(store, tmp_path):
    teacher = fresh_model(store, seed=3)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    spec = stage(
        epochs=30,
        patience=1,
        learning_rate=0.5,
        losses=(LossTerm("ranknet", "teacher"), LossTerm("feature_mse", "teacher")),
    )
    frozen = {"teacher": FrozenTeacher("teacher", teacher, store)}
    result = Trainer(spec, fresh_model(store), frozen, store, tmp_path).fit()
    assert result.epochs_run < 30
    assert result.epochs_run == result.best_epoch + 2
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training


def test_resuming_with_another_spec_is_refused(store, tmp_path):
    Trainer(stage(epochs=1), fresh_model(store), {}, store, tmp_path).fit()
    with pytest.raises(ValueError, match="different stage spec"):
        Trainer(stage(epochs=1, negatives=5), fresh_model(store), {}, store, tmp_path).fit(
            resume=True
        )


def poison_loss(monkeypatch, name, at_call, poison):
    """Make loss ``name`` return ``poison(value, student)`` at its ``at_call``-th call (0-based)."""
    original, calls = LOSSES[name], 0

    def poisoned(student, target, *, mask, **options):
        nonlocal calls
        value = original(student, target, mask=mask, **options)
        calls += 1
        return poison(value, student) if calls - 1 == at_call else value

    monkeypatch.setitem(LOSSES, name, poisoned)


def test_a_nan_loss_stops_the_stage_and_a_lower_learning_rate_resumes_the_last_good_epoch(
    store, tmp_path, monkeypatch, capsys
):
    one_epoch = fresh_model(store)
    Trainer(stage(epochs=1), one_epoch, {}, store, tmp_path / "one").fit()

    trainer = Trainer(stage(), fresh_model(store), {}, store, tmp_path / "cut")
    batches = len(trainer.lists)
    poison_loss(monkeypatch, "softmax_ce", batches + 2, lambda value, _: value * math.nan)
    with pytest.raises(TrainingDiverged) as diverged:
        trainer.fit()
    assert str(diverged.value) == (
        "stage 's' diverged at epoch 1, batch 2: loss is nan; the last good checkpoint "
        "(epoch 0) is kept: lower the learning rate and rerun with --resume"
    )
    monkeypatch.undo()
    checkpoint = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert checkpoint["state"]["epoch"] == 0
    for key, value in one_epoch.state_dict().items():
        assert torch.equal(checkpoint["model"][key], value), key
    assert [r["epoch"] for r in log_of(tmp_path / "cut")] == [0]

    resumed = Trainer(stage(learning_rate=1e-3), fresh_model(store), {}, store, tmp_path / "cut")
    result = resumed.fit(resume=True)
    assert (
        "s: resuming after epoch 0 with learning_rate 0.001 (was 0.005)" in capsys.readouterr().err
    )
    assert resumed.optimizer.param_groups[0]["lr"] == 1e-3
    assert result.epochs_run == 3
    assert [r["epoch"] for r in log_of(tmp_path / "cut")] == [0, 1, 2]
    assert all(math.isfinite(r["train_loss"]) for r in log_of(tmp_path / "cut"))


def test_non_finite_gradients_stop_the_stage_before_its_step(store, tmp_path, monkeypatch):
    # sqrt at 0 has an infinite slope: the loss stays finite, its gradients are NaN
    poison_loss(
        monkeypatch, "softmax_ce", 0, lambda value, student: value + (0 * student.sum()).sqrt()
    )
    model = fresh_model(store)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(stage(), model, {}, store, tmp_path)
    with pytest.raises(
        TrainingDiverged, match=r"^stage 's' diverged at epoch 0, batch 0: "
    ) as diverged:
        trainer.fit()
    assert "gradients are not finite (loss " in str(diverged.value)
    assert str(diverged.value).endswith(
        "no epoch had finished, so there is no checkpoint: lower the learning rate and rerun "
        "with --resume"
    )
    assert trainer.optimizer.state_dict()["state"] == {}  # no step was taken
    assert all(torch.equal(initial[k], v) for k, v in model.state_dict().items())
    assert not (tmp_path / "checkpoint.pt").exists()
    assert not (tmp_path / "model.safetensors").exists()


def test_a_huge_learning_rate_diverges_and_writes_nothing(store, tmp_path):
    with pytest.raises(TrainingDiverged) as diverged:
        Trainer(stage(learning_rate=1e30), fresh_model(store), {}, store, tmp_path).fit()
    assert str(diverged.value) == (
        "stage 's' diverged at epoch 0, batch 1: loss is nan; no epoch had finished, so there "
        "is no checkpoint: lower the learning rate and rerun with --resume"
    )
    assert not (tmp_path / "checkpoint.pt").exists()
    assert not (tmp_path / "model.safetensors").exists()


def test_loss_terms_are_checked():
    with pytest.raises(ValueError, match="unknown loss"):
        LossTerm("listnett")
    with pytest.raises(ValueError, match="needs a teacher"):
        LossTerm("feature_mse")


def test_scoring_every_item_is_for_next_item_windows():
    with pytest.raises(ValueError, match="unknown scored_items 'some'"):
        stage(objective="next_item", scored_items="some")
    with pytest.raises(ValueError, match='scored_items = "all" is for the next_item objective'):
        stage(scored_items="all")
    assert stage(objective="next_item", scored_items="all").scored_items == "all"


def test_same_seed_same_weights_with_several_threads(store, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        spec = stage(epochs=1, batch_size=512, negatives=19)
        runs = []
        for attempt in range(2):
            model = fresh_model(store, spec=TwoTowerSpec(embedding_dim=64, tower=(64,)))
            Trainer(spec, model, {}, store, tmp_path / str(attempt)).fit()
            runs.append(model.state_dict())
    finally:
        torch.set_num_threads(threads)
    for key, value in runs[0].items():
        assert torch.equal(value, runs[1][key]), key


def test_resume_drops_log_lines_of_epochs_the_checkpoint_does_not_hold(store, tmp_path):
    Trainer(stage(epochs=2), fresh_model(store), {}, store, tmp_path).fit()
    # As if killed after logging epoch 1 but before checkpointing it.
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    payload["state"]["epoch"] = 0
    torch.save(payload, tmp_path / "checkpoint.pt")
    Trainer(stage(epochs=2), fresh_model(store), {}, store, tmp_path).fit(resume=True)
    assert [r["epoch"] for r in log_of(tmp_path)] == [0, 1]


def test_the_train_state_keeps_the_best_epoch_and_counts_the_epochs_since():
    state, stats = TrainState(), EpochStats(examples=10, loss_sum=5.0, seconds=2.0)
    assert state.end_epoch(0, stats, {"ndcg@10": 0.3, "full_ndcg@10": 0.1}, "ndcg@10")
    assert not state.end_epoch(1, stats, {"ndcg@10": 0.2, "full_ndcg@10": 0.4}, "ndcg@10")
    assert (state.epoch, state.best_epoch, state.stale) == (1, 0, 1)
    assert state.result() == StageResult(
        best_epoch=0,
        best_valid=0.3,
        valid={"ndcg@10": 0.3, "full_ndcg@10": 0.1},
        epochs_run=2,
        seconds=4.0,
        examples_per_second=5.0,
    )


def test_the_checkpoint_holds_the_train_state_as_the_dict_older_runs_wrote(store, tmp_path):
    Trainer(stage(epochs=1), fresh_model(store), {}, store, tmp_path).fit()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["state"]
    assert " ".join(state) == "epoch best_valid best_metrics best_epoch stale seconds examples"
    assert TrainState(**state).epoch == 0


def test_checkpoints_of_another_format_are_refused(store, tmp_path):
    Trainer(stage(epochs=1), fresh_model(store), {}, store, tmp_path).fit()
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del payload["format"]
    torch.save(payload, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="another version"):
        Trainer(stage(epochs=1), fresh_model(store), {}, store, tmp_path).fit(resume=True)


def test_sharded_tables_adagrad_rate_defaults_to_a_multiple_of_the_adam_rate():
    assert stage(learning_rate=2e-3).table_adagrad_learning_rate == pytest.approx(0.02)
    assert stage(learning_rate=2e-3, adagrad_learning_rate=0.5).table_adagrad_learning_rate == 0.5


def test_the_learning_rate_warms_up_linearly_then_follows_its_schedule():
    constant = stage(learning_rate=0.01, epochs=4, warmup_epochs=1.0)
    assert constant.learning_rate_at(0.25) == pytest.approx(0.0025)
    assert constant.learning_rate_at(1.0) == pytest.approx(0.01)
    assert constant.learning_rate_at(3.5) == pytest.approx(0.01)
    cosine = stage(learning_rate=0.01, epochs=4, schedule="cosine")
    assert cosine.learning_rate_at(0.0) == pytest.approx(0.01)
    assert cosine.learning_rate_at(2.0) == pytest.approx(0.005)  # (1 + cos(π/2)) / 2
    assert cosine.learning_rate_at(3.0) == pytest.approx(0.01 * (1 + math.cos(0.75 * math.pi)) / 2)
    assert cosine.learning_rate_at(4.0) == pytest.approx(0.0, abs=1e-12)
    both = stage(learning_rate=0.01, epochs=4, schedule="cosine", warmup_epochs=2.0)
    assert both.learning_rate_at(1.0) == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi / 4)) / 2)
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        stage(schedule="linear")
    with pytest.raises(ValueError, match="warmup_epochs must be between 0 and epochs"):
        stage(epochs=3, warmup_epochs=4.0)


def test_each_step_takes_the_learning_rate_of_its_place_in_the_stage(store, tmp_path):
    spec = stage(epochs=2, schedule="cosine", warmup_epochs=0.5)
    trainer = Trainer(spec, fresh_model(store), {}, store, tmp_path)
    taken = []
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda: (taken.append(trainer.optimizer.param_groups[0]["lr"]), step())
    trainer.train_epoch(0)
    batches = len(trainer.lists)
    assert batches >= 2
    expected = [spec.learning_rate_at((k + 1) / batches) for k in range(batches)]
    assert taken == pytest.approx(expected)
    assert taken[-1] == pytest.approx(spec.learning_rate_at(1.0))  # half way down the cosine


def test_gbce_takes_the_stages_own_sampling_rate(store, tmp_path):
    gbce = LossTerm("gbce", options={"t": 0.5})
    sampled = stage(losses=(gbce,), negatives=4)
    items = len(store.items) - 1
    assert sampled.sampling_rate(items) == pytest.approx(4 / (items - 1))
    (term,) = Trainer(sampled, fresh_model(store), {}, store, tmp_path).objective.losses
    assert term.options == {"t": 0.5, "sampling_rate": pytest.approx(4 / (items - 1))}
    whole = stage(losses=(gbce,), objective="next_item", scored_items="all")
    assert whole.losses_for(items)[0].options["sampling_rate"] == 1.0
    with pytest.raises(ValueError, match="sampling_rate is the stage's own"):
        stage(losses=(LossTerm("gbce", options={"sampling_rate": 0.1}),))
    with pytest.raises(ValueError, match="gbce learns from labels"):
        LossTerm("gbce", source="teacher")


def test_gradients_are_clipped_to_the_stages_norm_before_each_step(store, tmp_path):
    trainer = Trainer(stage(clip_norm=1e-3), fresh_model(store), {}, store, tmp_path)
    norms = []
    step = trainer.optimizer.step

    def record_then_step():
        grads = [p.grad for p in trainer.adam_parameters.values() if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        step()

    trainer.optimizer.step = record_then_step
    trainer.train_epoch(0, max_batches=3)
    assert len(norms) == 3 and max(norms) == pytest.approx(1e-3, rel=1e-4)
    with pytest.raises(ValueError, match="clip_norm = 0.0: must be above 0"):
        stage(clip_norm=0.0)


def test_bf16_autocasts_the_stage_s_model_and_keeps_weights_and_teachers_in_float32(
    store, tmp_path
):
    teacher = FrozenTeacher("big", fresh_model(store, seed=1), store)
    model = fresh_model(store)
    spec = stage(precision="bf16", losses=(LossTerm("listnet", source="big"),))
    outputs: list[torch.dtype] = []
    model.user_tower.mlp.register_forward_hook(lambda _, __, out: outputs.append(out.dtype))
    teacher_outputs = []
    answer = Trainer(spec, model, {"big": teacher}, store, tmp_path)
    original = answer.teachers.answer

    def spied(*args):
        answered = original(*args)
        teacher_outputs.append(answered[0]["big"][2].dtype)
        return answered

    answer.teachers.answer = spied
    stats = answer.train_epoch(0, max_batches=2)
    assert math.isfinite(stats.loss_sum) and stats.examples > 0
    assert outputs == [torch.bfloat16] * 2 and teacher_outputs == [torch.float32] * 2
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        stage(precision="fp16")


def test_a_checkpoint_written_before_a_spec_field_existed_resumes_at_its_default(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(
        path, stage(), model={}, adapters={}, optimizer={}, embedding_optimizer={}, state={}
    )
    payload = torch.load(path, weights_only=True)
    older = json.loads(payload["spec"])
    del older["precision"]
    torch.save({**payload, "spec": json.dumps(older)}, path)
    assert load_checkpoint(path, stage(), announce=False) is not None
    with pytest.raises(ValueError, match="different stage spec"):
        load_checkpoint(path, stage(precision="bf16"), announce=False)


def test_a_duration_reads_as_a_person_would_say_it():
    assert [duration(s) for s in (0, 0.2, 0.6, 42, 751, 3720)] == [
        "0 s",
        "under 1 s",
        "1 s",
        "42 s",
        "12 min 31 s",
        "1 h 02 min",
    ]
