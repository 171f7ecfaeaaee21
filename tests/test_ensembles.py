import contextlib
import io
import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from recdistill.artifact import load_artifact
from recdistill.baselines import Ease, ease_weights, history_matrix
from recdistill.cli import main
from recdistill.config import load_run_config
from recdistill.data.batches import CandidateLists, FeatureStore
from recdistill.data.feature_store import Jagged
from recdistill.ensembles import EaseMember, EnsembleSpec, EnsembleTeacher, standardised
from recdistill.errors import ArtifactError
from recdistill.online import OnlineRanker
from recdistill.pipeline import run
from recdistill.teachers import FrozenTeacher
from tests.conftest import ONE_STAGE
from tests.test_trainer import fresh_model

# Longer than any history of the small world: a history bag then holds the whole history.
WHOLE = 1000


@pytest.fixture(scope="module")
def store(synthetic_dir):
    return FeatureStore(synthetic_dir, history_length=WHOLE)


@pytest.fixture(scope="module")
def ease(store):
    return Ease.fit(store, 30.0).scoring(store, half_life=3.0)


def test_the_default_grid_is_every_mix_in_quarters():
    spec = EnsembleSpec("mix", ("teacher", "ease_recency"))
    assert spec.grid == ((0.0, 1.0), (0.25, 0.75), (0.5, 0.5), (0.75, 0.25), (1.0, 0.0))
    assert len(EnsembleSpec("three", ("a", "b", "c")).grid) == 15
    assert EnsembleSpec("mix", ("a", "b"), steps=10).grid[1] == (0.1, 0.9)
    given = EnsembleSpec("mix", ("a", "b"), weights=([1, 0.5], [3, 1]))
    assert given.grid == ((2 / 3, 1 / 3), (0.75, 0.25))  # each mix brought to sum 1


@pytest.mark.parametrize(
    ("members", "options", "message"),
    [
        (("teacher",), {}, "two or more distinct members"),
        (("teacher", "teacher"), {}, "two or more distinct members"),
        (("teacher", "ease"), {"weights": ((1.0,),)}, "each one weight per member"),
        (("teacher", "ease"), {"weights": (0.5, 0.5)}, "each one weight per member"),
        (("teacher", "ease"), {"weights": ((1.0, -0.5),)}, "non-negative and not all zero"),
        (("teacher", "ease"), {"weights": ((0.0, 0.0),)}, "non-negative and not all zero"),
        (("teacher", "ease"), {"steps": 0}, "steps must be at least 1"),
    ],
)
def test_a_bad_ensemble_is_refused_by_its_table(members, options, message):
    with pytest.raises(ValueError, match=rf"\[ensembles.mix\]: .*{message}"):
        EnsembleSpec("mix", members, **options)


def test_standardised_rows_have_mean_zero_and_unit_spread_over_the_real_items():
    scores = torch.tensor([[99.0, 1.0, 2.0, 3.0], [-5.0, 4.0, 4.0, 4.0]])
    result = standardised(scores)
    torch.testing.assert_close(result[0, 1:], torch.tensor([-1.0, 0.0, 1.0]))
    assert result[0, 0].item() == pytest.approx((99.0 - 2.0) / 1.0)
    torch.testing.assert_close(result[1, 1:], torch.zeros(3))  # constant: spread taken as 1


def test_an_ease_member_on_a_whole_history_scores_as_the_ease_baseline(store, ease):
    member = EaseMember.of(ease)
    lists = CandidateLists(store, "valid", batch_size=64)
    batch = next(iter(lists))
    users = batch.users["user_id"].values()
    torch.testing.assert_close(
        member.catalogue_scores(batch), ease.scores[users], rtol=1e-4, atol=1e-4
    )


def test_an_ease_member_scores_a_training_list_from_the_items_before_its_positive(store, ease):
    member = EaseMember.of(ease)
    rows = np.arange(0, store.train_rows, 7)
    batch = store.training_batch(rows, np.empty((len(rows), 0), dtype=np.int64))
    past, lengths = store.past(rows)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    x = history_matrix(Jagged(offsets, past), len(store.items), half_life=3.0)
    expected = torch.as_tensor(x @ ease.weights, dtype=torch.float32)
    torch.testing.assert_close(member.catalogue_scores(batch), expected, rtol=1e-4, atol=1e-4)


def test_an_ensemble_mixes_its_members_standardised_scores(store, ease, tmp_path):
    teacher = FrozenTeacher("teacher", fresh_model(store), store)
    members = {"teacher": teacher, "ease_recency": EaseMember.of(ease)}
    mix = EnsembleTeacher("mix", members, (1.0, 0.5), store)
    rows = np.arange(0, store.train_rows, 11)
    batch = store.training_batch(rows, np.stack([rows % 5 + 1, rows % 7 + 2], axis=1))
    expected = standardised(teacher.catalogue_scores(batch)) + 0.5 * standardised(
        EaseMember.of(ease).catalogue_scores(batch)
    )
    torch.testing.assert_close(mix.catalogue_scores(batch), expected)
    state, _, scores, _ = mix.outputs(batch)
    assert state.shape == (len(rows), len(store.items))
    items = batch.items["item_id"].values()[batch.candidates]
    torch.testing.assert_close(scores, expected.gather(1, items))
    torch.testing.assert_close(mix(batch), scores)
    # one member alone ranks as that member does
    alone = EnsembleTeacher("alone", members, (1.0, 0.0), store)
    assert torch.equal(alone(batch).argsort(dim=1), teacher.outputs(batch).scores.argsort(dim=1))


def test_an_ensembles_ranking_excludes_the_past_and_the_positive(store, ease, tmp_path):
    members = {"teacher": FrozenTeacher("teacher", fresh_model(store), store)}
    members["ease_recency"] = EaseMember.of(ease)
    mix = EnsembleTeacher("mix", members, (0.5, 0.5), store, cache=tmp_path)
    ranked = mix.ranked(20)
    rows = np.arange(0, store.train_rows, 13)
    batch = store.training_batch(rows, np.empty((len(rows), 0), dtype=np.int64))
    scores = mix.catalogue_scores(batch)
    past, lengths = store.past(rows)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for i, row in enumerate(rows):
        banned = set(past[offsets[i] : offsets[i + 1]].tolist()) | {
            int(store.row_items(np.array([row]))[0]),
            0,
        }
        order = [int(j) for j in scores[i].argsort(descending=True) if int(j) not in banned]
        assert ranked[row].tolist() == order[:20]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"train_top20_mix_{mix.fingerprint}.npy"]


def test_the_weights_change_the_fingerprint(store, ease):
    members = {"teacher": FrozenTeacher("teacher", fresh_model(store), store)}
    members["ease_recency"] = EaseMember.of(ease)
    a = EnsembleTeacher("mix", members, (0.5, 0.5), store)
    b = EnsembleTeacher("mix", members, (0.25, 0.75), store)
    other = EaseMember(ease_weights(np.eye(len(store.items)), 10.0), 3.0)
    c = EnsembleTeacher("mix", {**members, "ease_recency": other}, (0.5, 0.5), store)
    assert len({a.fingerprint, b.fingerprint, c.fingerprint}) == 3


ENSEMBLE_RUN = """
[models.small]
embedding_dim = 4
tower = [8]
feature_dim = 2

[ensembles.mix]
members = ["teacher", "ease_recency"]

[stages.student]
model = "small"
epochs = 1
lists = { depth = 30, top = 5, uniform = 5 }
losses = [
    { fn = "softmax_ce" },
    { fn = "listmle", source = "mix", top_k = 5 },
    { fn = "ranknet", source = "mix", weight = 0.5 },
]
"""


@pytest.fixture(scope="module")
def ensemble_run(synthetic_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("ensemble")
    config = directory / "c.toml"
    config.write_text(ONE_STAGE + ENSEMBLE_RUN)
    out = directory / "run"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert (
            main(
                ["train", "--config", str(config), "--data", str(synthetic_dir), "--out", str(out)]
            )
            == 0
        )
    return out, buffer.getvalue()


def test_a_run_chooses_the_ensembles_weights_on_validation_and_scores_it(ensemble_run):
    out, printed = ensemble_run
    summary = json.loads((out / "summary.json").read_text())
    models = summary["models"]
    assert list(models) == ["teacher", "student", "mix", "popularity", "ease", "ease_recency"]
    mix = models["mix"]
    grid = EnsembleSpec("mix", ("teacher", "ease_recency")).grid
    tried = re.findall(
        r"^mix \[teacher (\S+)  ease_recency (\S+)\]: valid ndcg@10 (\S+)  full_ndcg@10 (\S+)$",
        printed,
        re.MULTILINE,
    )
    assert [(float(a), float(b)) for a, b, _, _ in tried] == list(grid)
    best = max(tried, key=lambda row: float(row[2]))
    assert mix["weights"] == {"teacher": float(best[0]), "ease_recency": float(best[1])}
    assert mix["valid"]["ndcg@10"] == pytest.approx(float(best[2]), abs=5e-5)
    assert mix["params"] == models["teacher"]["params"] + models["ease_recency"]["params"]
    for metric in ("ndcg@10", "full_ndcg@10"):
        assert 0 < mix["metrics"][metric] <= 1
    assert {"mix_vs_teacher", "mix_vs_ease_recency", "student_vs_mix"} <= set(
        summary["comparisons"]
    )
    assert models["student"]["training"]["teachers"] == ["mix"]
    assert len(list((out / "mix").glob("train_top30_mix_*.npy"))) == 1


def test_an_ensemble_is_in_the_report(ensemble_run):
    out, _ = ensemble_run
    assert main(["report", "--run", str(out)]) == 0
    assert "mix" in (out / "report" / "report.md").read_text()


def test_an_exported_ensemble_serves_the_scores_it_was_tested_with(ensemble_run, tmp_path):
    out, _ = ensemble_run
    directory = tmp_path / "mix"
    assert main(["export", "--run", str(out), "--model", "mix", "--out", str(directory)]) == 0
    artifact = load_artifact(directory)
    assert artifact.kind == "ensemble"
    assert sorted(p.name for p in (directory / "members").iterdir()) == ["ease_recency", "teacher"]
    assert artifact.members["ease_recency"][0].kind == "ease"
    weights = json.loads((out / "summary.json").read_text())["models"]["mix"]["weights"]
    assert {name: w for name, (_, w) in artifact.members.items()} == weights
    offline = load_file(str(out / "scores_test.safetensors"))
    ranker = OnlineRanker(artifact)
    served = ranker.score_lists(offline["user_id"].numpy(), offline["candidates"].numpy())
    np.testing.assert_allclose(served, offline["mix"].numpy(), rtol=1e-4, atol=1e-4)
    user, candidates = int(offline["user_id"][3]), offline["candidates"][3].numpy()
    one = ranker.scores(
        int(ranker.store.users.index(np.array([user]))[0]), ranker.store.items.index(candidates)
    )
    np.testing.assert_allclose(one.numpy(), served[3], rtol=1e-4, atol=1e-4)
    ranking = ranker.rank(10**9, candidates[:5])  # a user the model never saw
    assert ranking.cold_start and np.isfinite(ranking.scores).all()


def test_an_ensemble_whose_member_is_missing_is_refused(ensemble_run, tmp_path):
    out, _ = ensemble_run
    directory = tmp_path / "mix"
    assert main(["export", "--run", str(out), "--model", "mix", "--out", str(directory)]) == 0
    shutil.rmtree(directory / "members" / "teacher")
    with pytest.raises(ArtifactError, match="incomplete"):
        load_artifact(directory)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ('members = ["teacher", "ease_recency"]', 'members = ["teacher", "nobody"]'),
            "[ensembles.mix]: unknown member(s) ['nobody']",
        ),
        (
            ("[ensembles.mix]", "[ensembles.ease]"),
            "[ensembles.ease]: the run already has a model named 'ease'",
        ),
        (
            (
                '{ fn = "ranknet", source = "mix", weight = 0.5 }',
                '{ fn = "feature_mse", source = "mix" }',
            ),
            "feature_mse needs tower outputs; the ensemble 'mix' has none",
        ),
        (
            ('members = ["teacher", "ease_recency"]', 'members = ["student", "ease_recency"]'),
            "[stages.student] learns from ['student'], not trained before it",
        ),
        (
            (
                '{ fn = "ranknet", source = "mix", weight = 0.5 }',
                '{ fn = "ranknet", source = "ease" }',
            ),
            "[stages.student] learns from ['ease']: a baseline teaches only as a member",
        ),
        (
            ('{ fn = "ranknet", source = "mix", weight = 0.5 }', '{ fn = "gbce", source = "mix" }'),
            "[stages.student]: gbce learns from labels",
        ),
    ],
)
def test_a_bad_ensemble_stops_the_run_before_training(synthetic_dir, tmp_path, change, message):
    config = tmp_path / "c.toml"
    config.write_text(ONE_STAGE + ENSEMBLE_RUN.replace(*change))
    with pytest.raises(ValueError, match=re.escape(message)):
        run(load_run_config(config), synthetic_dir, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*/log.jsonl"))
