import ast
import os
import re
import runpy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import recdistill
from tests.conftest import PROJECT


def readme_snippet() -> str:
    """The Python block of the README's "Python API" section."""
    section = PROJECT.joinpath("README.md").read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_package_names_its_api_and_stays_light_to_import():
    assert {"prepare_data", "train", "report", "export", "load_ranker", "RunConfig"} <= set(
        dir(recdistill)
    )
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        recdistill.nothing  # noqa: B018


def test_the_readme_snippet_goes_from_a_dataframe_to_a_ranked_list(tmp_path, capsys):
    rng = np.random.default_rng(0)
    visitors = rng.integers(0, 60, size=3000)
    pd.DataFrame(
        {
            "visitor": [f"v{v}" for v in visitors],
            "sku": [f"sku-{(v * 7 + rng.integers(0, 25)) % 300}" for v in visitors],
            "ts": pd.to_datetime(1_700_000_000 + np.arange(3000) * 600, unit="s").map(
                pd.Timestamp.isoformat
            ),
        }
    ).to_csv(tmp_path / "events.csv", index=False)
    (tmp_path / "configs").symlink_to(PROJECT / "configs")
    (tmp_path / "snippet.py").write_text(readme_snippet())
    here = Path.cwd()
    os.chdir(tmp_path)
    try:
        runpy.run_path("snippet.py")
    finally:
        os.chdir(here)
    printed = capsys.readouterr().out.strip().splitlines()
    ranked = ast.literal_eval(printed[-1])  # the ranker's answer, as the snippet prints it
    assert [item for item, _ in ranked] != [] and len(ranked) == 2
    assert {item for item, _ in ranked} <= {"sku-1", "sku-9", "sku-4"}
    assert ranked[0][1] >= ranked[1][1]
    assert (tmp_path / "runs/shop/report/index.html").exists()
    assert (tmp_path / "artifacts/shop/manifest.json").exists()


def test_a_ranker_of_integer_ids_refuses_strings_as_the_server_does(tiny_artifacts):
    from recdistill.api import load_ranker

    ranker = load_ranker(tiny_artifacts["student"])
    assert len(ranker.rank(1, [1, 2, 3])) == 3
    assert len(ranker.rank(np.int64(1), np.array([1, 2]))) == 2
    with pytest.raises(ValueError, match="user_id: the model 'student' has integers as IDs"):
        ranker.rank("1", [1, 2, 3])
    with pytest.raises(ValueError, match="item IDs: the model 'student' has integers as IDs"):
        ranker.rank(1, [1, 2], recent_items=[True])
