import json
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest

from recdistill.abtest.analysis import SampleRatioMismatch
from recdistill.abtest.experiment import run_abtest
from recdistill.cli import main
from tests.conftest import ab_table

CONFIG = (
    ab_table(
        "cli-test",
        control=("popularity", 0.34),
        teacher=("teacher", 0.33),
        student=("student", 0.33),
    )
    + """
[artifacts]
popularity = "{popularity}"
teacher = "{teacher}"
student = "{student}"

[simulation]
data = "{data}"
days = {days}
requests_per_day = {requests_per_day}
latency_requests = 20

[analysis]
pre_days = 3
min_users = 20
"""
)


def write_config(tmp_path, artifacts, data, days=4, requests_per_day=0.5):
    path = tmp_path / "ab.toml"
    paths = {name: str(directory) for name, directory in artifacts.items()}
    path.write_text(CONFIG.format(**paths, data=data, days=days, requests_per_day=requests_per_day))
    return path


def test_abtest_writes_the_report_and_prints_the_verdict(
    tmp_path, capsys, tiny_artifacts, synthetic_dir
):
    config = write_config(tmp_path, tiny_artifacts, synthetic_dir)
    out = tmp_path / "ab"
    assert main(["abtest", "--config", str(config), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    verdict = json.loads((out / "summary.json").read_text())["verdict"]
    assert verdict in printed and "non-inferiority" in verdict
    assert "student vs teacher" in printed and "No sample ratio mismatch" in printed

    html, markdown = (out / "index.html").read_text(), (out / "report.md").read_text()
    assert html.count("data:image/png;base64,") == 2  # cumulative lift, per-segment lift
    for report in (html, markdown):
        assert verdict in report
        assert "student vs teacher" in report and "activity_tier" in report

    log = pq.read_table(out / "requests.parquet").to_pandas()
    assert {"request_id", "user_id", "arm", "items", "clicks", "ndcg", "latency_ms"} <= set(log)
    assert set(log["arm"]) == {"control", "teacher", "student"}
    assert set(log["day"]) == set(range(-3, 4))
    assert log["items"].map(len).eq(10).all()


@pytest.mark.slow
def test_online_mode_goes_through_the_server(tmp_path, tiny_artifacts, synthetic_dir):
    """A few hundred requests through a real server: its routing, its impression log."""
    config = write_config(tmp_path, tiny_artifacts, synthetic_dir, days=1, requests_per_day=0.6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleRatioMismatch)  # small arms, any split is fine
        result = run_abtest(config, tmp_path / "online", mode="online")
    log = result.log[result.log["period"] == "experiment"]
    assert 150 <= len(log) <= 400

    impressions = [
        json.loads(line)
        for line in (tmp_path / "online" / "impressions.jsonl").read_text().splitlines()
    ]
    assert sorted(log["request_id"]) == sorted(i["request_id"] for i in impressions)
    served = {i["request_id"]: i for i in impressions}
    for row in log.itertuples():
        assert served[row.request_id]["arm"] == row.arm
        assert served[row.request_id]["items"] == list(row.items)

    arms = result.analysis.arms.set_index(["segment", "arm"]).loc["all"]
    assert set(arms.index) == {"control", "teacher", "student"}
    for column in ("latency_ms_p50", "latency_ms_p99", "round_trip_ms_p50"):
        assert np.isfinite(arms[column]).all() and (arms[column] > 0).all()
    assert (arms["round_trip_ms_p50"] > arms["latency_ms_p50"]).all()  # HTTP costs something
    print(arms[["latency_ms_p50", "latency_ms_p99", "round_trip_ms_p50"]])
