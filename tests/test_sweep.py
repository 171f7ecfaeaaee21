import dataclasses
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recdistill.artifact import load_artifact
from recdistill.cli import main
from recdistill.config import load_sweep_config
from recdistill.ensembles import EnsembleTeacher
from recdistill.evaluate import evaluate, mean_metrics
from recdistill.layout import LOG, MANIFEST, RESULT, WEIGHTS
from recdistill.online import OnlineRanker
from recdistill.quantize import QuantizationSpec
from recdistill.summary import (
    AbImpact,
    CandidateResult,
    CandidateTraining,
    ClockLatency,
    Int8Result,
    Latency,
    SegmentedValidScore,
    SegmentScore,
    SelectionSpec,
    SimulatedImpact,
    from_json,
    to_json,
)
from recdistill.sweep.bench import Bench
from recdistill.sweep.plan import load_plan
from recdistill.sweep.search import search, search_one
from recdistill.sweep.selection import finalists, finalize, pareto_frontier, select, within_budget
from recdistill.trainer import Trainer
from tests.conftest import ONE_STAGE, PROJECT

TEST_FILES = ("test.parquet", "candidates_test.parquet")

# Two tiny architectures × two loss mixes, taught by the tiny run's teacher and intermediate.
TINY_SWEEP = """
[sweep]
base_run = "{base_run}"
min_segment_users = 30
latency_rounds = 2
latency_requests = 10
{search}

[selection]  # never assert timings: a budget every candidate meets
p99_ms = 1e9
finalists = 2

[impact.simulation]  # a short experiment on the 400-user world
days = 3
candidates = 20
popular_share = 1.0
popular_pool = 0.2
k = 5

[impact.analysis]
margin = 0.9  # wide: tiny students must qualify for the export tests
pre_days = 3

[train]
history_length = 10
batch_size = 512
negatives = 4
epochs = {epochs}
patience = 2
learning_rate = 5e-3

[models.narrow]
embedding_dim = 4
tower = [8]
feature_dim = 2

[models.wide]
embedding_dim = 8
tower = [16, 8]
feature_dim = 2

[mixes]
listwise = [{{ fn = "softmax_ce" }}, {{ fn = "listnet", source = "intermediate", temperature = 2.0 }}]
hybrid_feature = [
    {{ fn = "softmax_ce" }},
    {{ fn = "ranknet", source = "intermediate", weight = 0.5 }},
    {{ fn = "feature_mse", source = "teacher", weight = 0.1 }},
]
"""
NAMES = ("narrow-listwise", "narrow-hybrid_feature", "wide-listwise", "wide-hybrid_feature")


def _config(directory: Path, run: Path, *, epochs: int = 1, samples: int | None = None) -> Path:
    search = "" if samples is None else f'search = "random"\nsamples = {samples}'
    path = directory / "sweep.toml"
    path.write_text(TINY_SWEEP.format(base_run=run, search=search, epochs=epochs))
    return path


@pytest.fixture(scope="module")
def tiny_sweep(tiny_run, synthetic_dir, tmp_path_factory):
    _, run = tiny_run
    directory = tmp_path_factory.mktemp("sweep")
    config, out = _config(directory, run), directory / "sweep"
    command = ["sweep", "--config", str(config), "--data", str(synthetic_dir), "--out", str(out)]
    assert main(command) == 0
    return out


def test_the_sweep_scores_every_candidate_on_validation(tiny_sweep):
    summary = json.loads((tiny_sweep / "summary.json").read_text())
    assert tuple(summary["candidates"]) == NAMES
    for name, result in summary["candidates"].items():
        assert json.loads((tiny_sweep / name / RESULT).read_text()) == result
        assert 0 < result["valid"]["ndcg@10"] < 1
        worst = result["valid"]["worst_segment"]
        retentions = [s["retention"] for s in result["valid"]["segments"]]
        assert worst["retention"] == min(retentions) and worst["users"] >= 30
        assert result["artifact_bytes"] == (tiny_sweep / name / WEIGHTS).stat().st_size
        assert result["int8"]["artifact_bytes"] < result["artifact_bytes"]
        for measured in (result, result["int8"]):
            for clock in ("wall", "cpu"):
                assert (
                    0 < measured["latency_ms"][clock]["p50"] <= measured["latency_ms"][clock]["p99"]
                )
    by_mix = {r["mix"] for r in summary["candidates"].values()}
    assert by_mix == {"listwise", "hybrid_feature"}


def _eligible(summary: dict) -> list[str]:
    """The candidates non-inferior when interleaved and with no losing segment (flagged and
    below the teacher), smallest first: the rule's order for its finalists."""
    eligible = [
        r
        for r in summary["candidates"].values()
        if r["impact"]["standing"] == "non-inferior"
        and not any(s["flagged"] and s["retention"] < 1 for s in r["valid"]["segments"])
    ]
    eligible.sort(key=lambda r: (r["params"], -r["impact"]["lift"], r["name"]))
    return [r["name"] for r in eligible]


def test_every_candidate_meets_the_teacher_in_simulated_experiments(tiny_sweep):
    summary = json.loads((tiny_sweep / "summary.json").read_text())
    assert summary["reference"] == "teacher"
    assert summary["truth"] == "the synthetic generator's ground truth"
    for result in summary["candidates"].values():
        impact = result["impact"]
        assert impact["wins"] + impact["losses"] + impact["ties"] == impact["users"] > 300
        low, high = impact["lift_ci"]
        assert low < impact["lift"] < high and 0 < impact["share"] < 1
        assert impact["standing"] in ("non-inferior", "inconclusive", "inferior")
    with_ab = [name for name, r in summary["candidates"].items() if "ab" in r["impact"]]
    assert with_ab and sorted(with_ab) == sorted(n for n in _eligible(summary)[:2])  # finalists
    for name in with_ab:
        ab = summary["candidates"][name]["impact"]["ab"]
        assert ab["users"][0] > 100 and ab["lift_ci"][0] < ab["lift"] < ab["lift_ci"][1]


def test_the_chosen_student_is_the_smallest_that_meets_the_rule_and_is_scored_on_test(tiny_sweep):
    summary = json.loads((tiny_sweep / "summary.json").read_text())
    candidates, selection = summary["candidates"], summary["selection"]
    assert set(selection["within_budget"]) == set(NAMES)
    chosen = _eligible(summary)[0]
    assert selection["chosen"] == chosen == selection["qualified"][0]
    assert all(
        candidates[name]["impact"]["ab"]["standing"] != "inferior"
        for name in selection["qualified"]
    )
    for name in ("best", "best_int8"):
        entry = summary["models"][name]
        assert (
            entry["candidate"] == chosen and entry["preset"] == candidates[chosen]["architecture"]
        )
        assert {"ndcg@10", "hr@10", "mrr", "full_ndcg@10", "full_recall@10"} <= set(
            entry["metrics"]
        )
    assert summary["models"]["best_int8"]["quantization"] == {"embeddings": True, "linear": True}


def test_best_and_its_int8_copy_export_and_serve(tiny_sweep, tmp_path):
    summary = json.loads((tiny_sweep / "summary.json").read_text())
    served = {}
    for name in ("best", "best_int8"):
        out = tmp_path / name
        assert main(["export", "--run", str(tiny_sweep), "--model", name, "--out", str(out)]) == 0
        manifest = json.loads((out / MANIFEST).read_text())
        assert manifest["offline_metrics"] == summary["models"][name]["metrics"]
        ranker = OnlineRanker(load_artifact(out))
        items = ranker.store.items.values[:30]
        served[name] = ranker.rank(int(ranker.store.users.values[0]), items)
        assert sorted(served[name].items.tolist()) == sorted(items.tolist())
    assert (tmp_path / "best_int8" / WEIGHTS).stat().st_size < (
        tmp_path / "best" / WEIGHTS
    ).stat().st_size


def test_a_candidate_the_rule_passed_over_exports_as_it_was_trained(tiny_sweep, tmp_path):
    summary = json.loads((tiny_sweep / "summary.json").read_text())
    name = next(n for n in summary["candidates"] if n != summary["selection"]["chosen"])
    out = tmp_path / name
    assert main(["export", "--run", str(tiny_sweep), "--model", name, "--out", str(out)]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["name"] == name and manifest["offline_metrics"] == {}  # never on test
    assert manifest["params"] == summary["candidates"][name]["params"]
    assert (out / WEIGHTS).read_bytes() == (tiny_sweep / name / WEIGHTS).read_bytes()
    assert OnlineRanker(load_artifact(out)).name == name


def test_the_report_plots_the_frontier_and_lists_every_candidate(tiny_sweep):
    html = (tiny_sweep / "report" / "index.html").read_text()
    markdown = (tiny_sweep / "report" / "report.md").read_text()
    assert html.count("data:image/png;base64,") == 2  # the frontier, the simulated impact
    for name in NAMES:
        assert name in html and name in markdown
    summary = json.loads((tiny_sweep / "summary.json").read_text())
    chosen = summary["selection"]["chosen"]
    for text in (html, markdown):
        assert "Which loss mix won per segment" in text and "Float against int8" in text
        assert "Simulated impact against teacher" in text and f"Chosen: {chosen}" in text
        assert "the smallest candidate (parameters) with p99" in text  # the rule, stated


def _result(name, ndcg, worst, p99, size, *, params=0, standing=None, flagged=False, ab=None):
    latency = Latency(p99 / 2, p99)
    segment = SegmentScore("all", "all", 100, ndcg, ndcg, worst, [worst, worst])
    slice_ = SegmentScore("tier", "heavy", 100, ndcg, ndcg, worst, [worst, worst], flagged)
    valid = SegmentedValidScore(ndcg, segment, [segment, slice_])
    impact = None
    if standing is not None:
        ab_impact = None if ab is None else AbImpact([100, 100], 0.0, [-0.1, 0.1], 1.0, 0.1, ab)
        impact = SimulatedImpact(
            100, 10, 10, 80, 0.5, [0.4, 0.6], ndcg, [-0.1, 0.1], 1.0, standing, ab_impact
        )
    return CandidateResult(
        name=name,
        architecture="s",
        mix="m",
        model={},
        settings={},
        losses=[],
        params=params,
        multiply_adds=0.0,
        training=CandidateTraining(0, 1, 0.0),
        valid=valid,
        artifact_bytes=size,
        int8=Int8Result(QuantizationSpec(), valid, size),
        latency_ms=ClockLatency(0.0, latency, latency),
        impact=impact,
    )


def test_selection_takes_the_smallest_non_inferior_finalist_with_no_losing_segment():
    ok = "non-inferior"
    results = [
        _result("slow", 0.5, 1, 3.0, 100, params=10, standing=ok),
        _result("big", 0.4, 1, 1.0, 900, params=20, standing=ok),
        _result("unsure", 0.4, 1, 1.0, 100, params=30, standing="inconclusive"),
        _result("unfair", 0.4, 0.97, 1.0, 100, params=40, standing=ok, flagged=True),
        _result("worse", 0.4, 1, 1.0, 100, params=50, standing=ok, ab="inferior"),
        _result("good", 0.4, 1, 1.0, 100, params=60, standing=ok, ab="inconclusive"),
        # Keeps less than its other users there, but still more than the teacher.
        _result(
            "ahead", 0.4, 1.05, 1.0, 100, params=65, standing=ok, flagged=True, ab="non-inferior"
        ),
        _result("larger", 0.4, 1, 1.0, 100, params=70, standing=ok, ab="non-inferior"),
    ]
    rule = SelectionSpec(p99_ms=2.0, max_artifact_bytes=500, finalists=3)
    assert [r.name for r in results if within_budget(r, rule)] == [
        "unsure", "unfair", "worse", "good", "ahead", "larger"
    ]  # fmt: skip
    assert [r.name for r in finalists(results, rule)] == ["worse", "good", "ahead"]
    choice = select(results, rule)
    assert choice.qualified == ("good", "ahead") and choice.chosen == "good"
    assert select(results, dataclasses.replace(rule, finalists=1)).chosen is None
    assert select(results, SelectionSpec(p99_ms=0.1)).chosen is None
    assert "non-inferior within 2.0%" in rule.describe(0.02)


def test_the_budget_reads_the_configured_clock():
    result = _result("x", 0.4, 1.0, 1.0, 10)
    result = dataclasses.replace(
        result, latency_ms=dataclasses.replace(result.latency_ms, wall=Latency(1.0, 9.0))
    )
    assert not within_budget(result, SelectionSpec(p99_ms=2.0, latency_clock="wall"))
    assert within_budget(result, SelectionSpec(p99_ms=2.0, latency_clock="cpu"))


def test_the_frontier_keeps_exactly_the_undominated_candidates():
    results = [
        _result("best", 0.50, 1.0, 2.0, 200),
        _result("fast", 0.40, 1.0, 1.0, 200),
        _result("tiny", 0.30, 1.0, 2.0, 50),
        _result("dominated", 0.30, 1.0, 2.0, 200),  # worse than "tiny" on size only
        _result("twin", 0.40, 1.0, 1.0, 200),  # equal to "fast": neither beats the other
    ]
    assert pareto_frontier(results, SelectionSpec()) == ["best", "fast", "tiny", "twin"]


def _without_test_split(data: Path, copy: Path) -> Path:
    shutil.copytree(data, copy, ignore=shutil.ignore_patterns(*TEST_FILES))
    return copy


def test_search_and_selection_never_read_the_test_split(
    tiny_run, synthetic_dir, tmp_path, monkeypatch
):
    _, run = tiny_run
    data = _without_test_split(synthetic_dir, tmp_path / "data")
    plan = load_plan(_config(tmp_path, run, samples=2), data, tmp_path / "sweep")
    results = search(plan)  # trains, validates, quantizes, times: with no test split on disk
    choice = select(results, plan.selection)
    assert choice.chosen is not None

    for name in TEST_FILES:
        shutil.copyfile(synthetic_dir / name, data / name)
    opened = []
    read_table = pq.read_table

    def spy(source, *args, **kwargs):
        opened.append(Path(source).name)
        return read_table(source, *args, **kwargs)

    monkeypatch.setattr(pq, "read_table", spy)
    summary = finalize(plan, results, choice)
    # The test lists are read once for the chosen student and once for its int8 copy.
    assert opened.count("candidates_test.parquet") == 2
    assert summary["models"]["best"]["candidate"] == choice.chosen


class Interrupted(Exception):
    pass


def test_a_rerun_skips_finished_candidates_and_resumes_a_half_trained_one(
    tiny_run, synthetic_dir, tmp_path, monkeypatch
):
    _, run = tiny_run
    plan = load_plan(_config(tmp_path, run, epochs=2, samples=2), synthetic_dir, tmp_path / "s")
    first, second = (c.name for c in plan.candidates)
    checkpoint = Trainer._checkpoint

    def stop_after_one_epoch(self, state):
        checkpoint(self, state)
        if self.spec.name == second:
            raise Interrupted

    monkeypatch.setattr(Trainer, "_checkpoint", stop_after_one_epoch)
    with pytest.raises(Interrupted):
        search(plan)
    assert (plan.out / first / RESULT).exists() and not (plan.out / second / RESULT).exists()
    finished = (plan.out / first / RESULT).read_text()

    fitted = []
    fit = Trainer.fit

    def spy(self, **kwargs):
        fitted.append(self.spec.name)
        return fit(self, **kwargs)

    monkeypatch.setattr(Trainer, "_checkpoint", checkpoint)
    monkeypatch.setattr(Trainer, "fit", spy)
    results = search(plan)
    assert fitted == [second]
    epochs = [
        json.loads(line)["epoch"] for line in (plan.out / second / LOG).read_text().splitlines()
    ]
    assert epochs == [0, 1]
    assert from_json(CandidateResult, json.loads(finished)).valid == results[0].valid
    assert all(r.latency_ms is not None for r in results)

    longer = load_plan(_config(tmp_path, run, epochs=3, samples=2), synthetic_dir, plan.out)
    with pytest.raises(ValueError, match="written for other settings"):
        search(longer)


@pytest.mark.slow
def test_parallel_jobs_train_the_same_students(tiny_run, tiny_sweep, synthetic_dir, tmp_path):
    _, run = tiny_run
    plan = load_plan(_config(tmp_path, run, samples=2), synthetic_dir, tmp_path / "sweep")
    results = search(plan, jobs=2)
    serial = json.loads((tiny_sweep / "summary.json").read_text())["candidates"]
    for result in results:
        assert to_json(result.valid) == serial[result.name]["valid"]


def test_configs_the_teachers_cannot_serve_are_refused(tiny_run, synthetic_dir, tmp_path):
    _, run = tiny_run
    config = _config(tmp_path, run)
    text = config.read_text()
    config.write_text(text.replace("history_length = 10", "history_length = 20"))
    with pytest.raises(ValueError, match="history_length = 20, but .* trained with 10"):
        load_plan(config, synthetic_dir, tmp_path / "out")
    config.write_text(text.replace('source = "intermediate"', 'source = "oracle"'))
    with pytest.raises(ValueError, match=r"has no trained \['oracle'\]"):
        load_plan(config, synthetic_dir, tmp_path / "out")
    config.write_text(text.replace(f'base_run = "{run}"', ""))
    with pytest.raises(ValueError, match="needs base_run"):
        load_plan(config, synthetic_dir, tmp_path / "out")


def test_random_search_trains_a_seeded_subset_of_the_grid(tiny_run, synthetic_dir, tmp_path):
    _, run = tiny_run
    names = [
        [
            c.name
            for c in load_plan(
                _config(tmp_path, run, samples=3), synthetic_dir, tmp_path
            ).candidates
        ]
        for _ in range(2)
    ]
    assert names[0] == names[1] and len(set(names[0])) == 3 and set(names[0]) <= set(NAMES)


def test_sweep_is_a_cli_command(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    assert "--jobs" in capsys.readouterr().out


ENSEMBLE_BASE = """
[ensembles.mix]
members = ["teacher", "ease_recency"]
weights = [[0.7, 0.3]]
"""

ENSEMBLE_MIX = """
[mixes]
rrd = [{ fn = "softmax_ce" }, { fn = "listmle", source = "mix", top_k = 5 }]
"""


def test_an_ensemble_of_the_base_run_teaches_as_the_run_built_it(synthetic_dir, tmp_path):
    """The base run's ensemble (its stage and a refitted EASE baseline, at the weights the
    run chose) teaches the candidates: rebuilt by the sweep, it ranks the validation lists
    exactly as the run measured it."""
    base = tmp_path / "base.toml"
    base.write_text(ONE_STAGE + ENSEMBLE_BASE)
    run = tmp_path / "run"
    command = ["train", "--config", str(base), "--data", str(synthetic_dir), "--out", str(run)]
    assert main(command) == 0
    text = _config(tmp_path, run).read_text()
    text = text[: text.index("[models.narrow]")] + "[models.narrow]\nembedding_dim = 4\n"
    text += "tower = [8]\nfeature_dim = 2\n" + ENSEMBLE_MIX
    text = text.replace("[sweep]\n", "[sweep]\nlists = { depth = 30, top = 5, uniform = 5 }\n")
    config = tmp_path / "sweep_mix.toml"
    config.write_text(text)
    plan = load_plan(config, synthetic_dir, tmp_path / "sweep")
    (candidate,) = plan.candidates
    assert candidate.stage.teachers == ("mix",)
    bench = Bench(plan)
    mix = bench.frozen["mix"]
    assert isinstance(mix, EnsembleTeacher) and mix.weights == {"teacher": 0.7, "ease_recency": 0.3}
    valid = mean_metrics(evaluate(mix, bench.store, "valid", name="mix"))
    summary = json.loads((run / "summary.json").read_text())
    assert valid["ndcg@10"] == pytest.approx(summary["models"]["mix"]["valid"]["ndcg@10"], abs=1e-6)

    result = search_one(bench, candidate)
    assert 0 < result.valid.ndcg < 1 and result.losses[1] == "1·listmle(mix, top_k=5)"
    # The RRD lists are drawn from its rankings of every train row, kept with the run.
    assert candidate.stage.lists is not None
    assert len(list((run / "mix").glob("train_top30_mix_*.npy"))) == 1

    config.write_text(text.replace('source = "mix"', 'source = "ease_recency"'))
    with pytest.raises(ValueError, match=r"has no trained \['ease_recency'\]"):
        load_plan(config, synthetic_dir, tmp_path / "other")


@pytest.mark.parametrize("name", ["sweep_ml100k.toml", "sweep_synthetic.toml"])
def test_the_shipped_sweep_configs_parse_and_state_the_rule(name):
    config = load_sweep_config(PROJECT / "configs" / name)
    assert config.selection.finalists >= 1 and config.impact.analysis.margin == 0.02
    sources = {term.source for terms in config.mixes.values() for term in terms}
    if name == "sweep_ml100k.toml":  # the full search; the demo's is three quick bags
        assert any(spec.is_sequence for spec in config.models.values())
    assert sources - {"labels"}  # every mix is taught
