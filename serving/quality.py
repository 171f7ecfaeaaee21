"""Ranking quality of a running server, measured over HTTP on a split's candidate lists.

Each saved candidate list (held-out item first) is sent to ``POST /rank`` as is; the scores
that come back are put in the list's order and scored with the same metric code as offline
evaluation, so the result can be compared with ``summary.json`` figure for figure.
"""

from __future__ import annotations

from pathlib import Path

import httpx2
import numpy as np
import pyarrow.parquet as pq

from recdistill.layout import DataLayout
from recdistill.metrics import list_metrics

REPORTED = ("ndcg@10", "hr@10", "mrr")


def served_metrics(url: str, data: Path, split: str = "test") -> dict[str, float]:
    """Mean ``ndcg@10``, ``hr@10`` and ``mrr`` of the server at ``url`` on ``split``'s lists."""
    table = pq.read_table(DataLayout(Path(data)).candidates(split)).to_pydict()
    scores = []
    with httpx2.Client(base_url=url, timeout=30.0) as client:
        for user_id, candidates in zip(table["user_id"], table["candidates"]):
            response = client.post("/rank", json={"user_id": user_id, "candidates": candidates})
            response.raise_for_status()
            served = {item["item_id"]: item["score"] for item in response.json()["items"]}
            scores.append([served[item] for item in candidates])
    metrics = list_metrics(np.asarray(scores, dtype=np.float32))
    return {name: float(metrics[name].mean()) for name in REPORTED}
