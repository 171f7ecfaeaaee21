"""`recdistill abtest analyze`: a server's impression log joined with the events reported for
it gives the per-request log, the report and the verdict the simulator gives."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from recdistill.abtest.analysis import SampleRatioMismatch
from recdistill.abtest.experiment import run_abtest
from recdistill.abtest.live import DroppedEvents, read_event_export, request_log
from recdistill.cli import main
from recdistill.config import load_experiment
from recdistill.errors import DataFormatError
from recdistill.impressions import read_log
from tests.abtest.test_abtest_cli import write_config
from tests.conftest import ab_table


def impression(request_id, user, arm, items, time, teams=None):
    logged = {
        "request_id": request_id,
        "time": time,
        "user_id": user,
        "arm": arm,
        "model": arm,
        "version": "v",
        "items": items,
        "latency_ms": 1.0,
    }
    return logged | ({} if teams is None else {"teams": teams})


def click(request_id, item, event="click"):
    return {"request_id": request_id, "item_id": item, "event": event, "time": 0.0}


@pytest.fixture
def ab_experiment(tmp_path):
    config = tmp_path / "ab.toml"
    config.write_text(
        ab_table("live", control=("a", 0.5), treatment=("b", 0.5))
        + '[analysis]\nship = ["treatment", "control"]\n'
    )
    return load_experiment(config, live=True)


def test_events_join_their_requests_and_bad_ones_are_left_out_and_counted(ab_experiment):
    impressions = [
        impression("r1", 1, "control", [10, 11, 12], 100.0),
        impression("r2", 2, "treatment", [12, 13, 14], 90_000.0),
        impression("r3", 3, "elsewhere", [12, 13, 14], 100.0),  # an arm of another experiment
    ]
    events = [
        click("r1", 11),
        click("r1", 11),  # reported twice: once
        click("r2", 14),
        click("r2", 14, "conversion"),
        click("r2", 99),  # not shown
        click("r9", 10),  # no such request
    ]
    with pytest.warns(DroppedEvents, match="1 event.* requests .* and 1 for items"):
        log = request_log(impressions, events, ab_experiment)
    assert log["request_id"].tolist() == ["r1", "r2"]
    assert [c.tolist() for c in log["clicks"]] == [[0, 1, 0], [0, 0, 1]]
    assert log["n_clicks"].tolist() == [1, 1] and log["n_conversions"].tolist() == [0, 1]
    assert log["day"].tolist() == [0, 1] and (log["period"] == "experiment").all()
    assert log["ndcg"].isna().all()


def test_an_event_export_is_read_from_csv_or_parquet(tmp_path):
    rows = pd.DataFrame(
        {
            "request_id": ["a1", "a2"],
            "item_id": [5, 7],
            "event": ["click", "conversion"],
            "time": [1.5, 2.5],
            "campaign": ["x", "y"],  # other columns are ignored
        }
    )
    rows.to_csv(tmp_path / "events.csv", index=False)
    rows.to_parquet(tmp_path / "events.parquet")
    expected = [
        {"request_id": "a1", "item_id": 5, "event": "click", "time": 1.5},
        {"request_id": "a2", "item_id": 7, "event": "conversion", "time": 2.5},
    ]
    assert read_event_export(tmp_path / "events.csv") == expected
    assert read_event_export(tmp_path / "events.parquet") == expected


def test_a_bad_event_export_names_its_file_and_line(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("request_id,item_id,event,time\na1,5,click,1\na2,6,purchase,2\n")
    with pytest.raises(DataFormatError, match=r"events.csv line 3: event 'purchase'"):
        read_event_export(path)
    path.write_text("request_id,item_id,event,time\na1,5,click,soon\n")
    with pytest.raises(DataFormatError, match=r"events.csv line 2: .*time a number"):
        read_event_export(path)
    path.write_text("request_id,item,event,time\na1,5,click,1\n")
    with pytest.raises(ValueError, match=r"no column\(s\) \['item_id'\]"):
        read_event_export(path)


@pytest.mark.slow
@pytest.mark.parametrize("design", ["ab", "interleaving"])
def test_analysing_the_online_simulators_logs_gives_its_own_verdict_and_lift(
    tmp_path, tiny_artifacts, synthetic_dir, design
):
    """The online simulator posts every click through POST /feedback; `abtest analyze` of the
    server's impression and event logs (and of the events exported as CSV) gives the
    simulator's verdict and lift. CUPED is off: a live log has no pre-period."""
    config = write_config(tmp_path, tiny_artifacts, synthetic_dir, days=2, requests_per_day=0.6)
    text = config.read_text().replace("pre_days = 3", "cuped = false")
    if design == "interleaving":
        arms = '[ab]\nsalt = "live"\ndesign = "interleaving"\n'
        arms += '[ab.arms.student]\nmodel = "student"\n[ab.arms.teacher]\nmodel = "teacher"\n'
        text = arms + text[text.index("[artifacts]") :]
    config.write_text(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleRatioMismatch)
        simulated = run_abtest(config, tmp_path / "online", mode="online")
    out = tmp_path / "online"
    events = read_log(out / "events.jsonl")
    experiment_log = simulated.log[simulated.log["period"] == "experiment"]
    assert len(events) == experiment_log["n_clicks"].sum() > 0

    pd.DataFrame(events).to_csv(tmp_path / "export.csv", index=False)
    sources = {
        "live": ["--events", str(out / "events.jsonl")],
        "export": ["--events-from", str(tmp_path / "export.csv")],
    }
    expected = json.loads((out / "summary.json").read_text())
    for name, source in sources.items():
        command = ["abtest", "analyze", "--config", str(config), "--out", str(tmp_path / name)]
        command += ["--impressions", str(out / "impressions.jsonl"), "--data", str(synthetic_dir)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SampleRatioMismatch)
            assert main(command + source) == 0
        analysed = json.loads((tmp_path / name / "summary.json").read_text())
        assert analysed["verdict"] == expected["verdict"]
        assert analysed["ship"] == expected["ship"]
        decision = "preference" if design == "interleaving" else "ctr"
        lifts = [
            {k: row[k] for k in ("treatment", "baseline", "lift", "ci_low", "ci_high", "p_value")}
            for summary in (analysed, expected)
            for row in summary["lifts"]
            if row["metric"] == decision
        ]
        half = len(lifts) // 2
        assert half >= 1 and len(lifts) == 2 * half
        for got, want in zip(lifts[:half], lifts[half:]):
            assert got["treatment"] == want["treatment"] and got["baseline"] == want["baseline"]
            np.testing.assert_allclose(
                [got[k] for k in ("lift", "ci_low", "ci_high", "p_value")],
                [want[k] for k in ("lift", "ci_low", "ci_high", "p_value")],
                rtol=1e-9,
            )
        arms = {row["arm"]: row for row in analysed["arms"]}
        for row in arms.values():
            assert row["latency_ms_p50"] > 0 and row["throughput_rps"] > 0
