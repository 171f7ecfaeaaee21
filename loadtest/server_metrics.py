"""The server's own view of ``/rank`` latency, read from its Prometheus histogram.

The server times each request from arrival in its middleware to response ready; the load
generator's times add the network, HTTP and any queueing on either side. A client p99 far
above the server's says the time goes outside the ranking code.
"""

from __future__ import annotations

import math

import httpx2
from prometheus_client.parser import text_string_to_metric_families

RANK_LATENCY = "recdistill_rank_latency_seconds"

# Upper bound in seconds (le) -> cumulative count of observations at or below it.
Buckets = dict[float, float]


def rank_latency_buckets(exposition: str) -> Buckets:
    """The /rank latency buckets in Prometheus text ``exposition``, summed over models and arms."""
    buckets: Buckets = {}
    for family in text_string_to_metric_families(exposition):
        if family.name != RANK_LATENCY:
            continue
        for sample in family.samples:
            if sample.name == f"{RANK_LATENCY}_bucket":
                upper = float(sample.labels["le"])
                buckets[upper] = buckets.get(upper, 0.0) + sample.value
    return buckets


def scrape_rank_latency(base_url: str) -> Buckets:
    try:
        response = httpx2.get(f"{base_url}/metrics", timeout=10.0)
        response.raise_for_status()
    except httpx2.HTTPError as error:
        raise RuntimeError(f"cannot read {base_url}/metrics: {error}") from error
    return rank_latency_buckets(response.text)


def bucket_difference(after: Buckets, before: Buckets) -> Buckets:
    """The observations made between two snapshots of the same cumulative histogram."""
    return {upper: count - before.get(upper, 0.0) for upper, count in after.items()}


def observations(buckets: Buckets) -> float:
    return buckets.get(math.inf, 0.0)


def histogram_quantile(q: float, buckets: Buckets) -> float | None:
    """The ``q`` quantile, interpolated linearly within its bucket as Prometheus'
    ``histogram_quantile`` does; None without observations.

    With cumulative counts ``c_i`` at upper bounds ``b_i`` and ``n = c_inf``, the quantile
    falls in the first bucket ``i`` with ``c_i >= q n`` and is
    ``b_{i-1} + (b_i - b_{i-1}) (q n - c_{i-1}) / (c_i - c_{i-1})`` (``b_0 = 0``); in the
    ``+Inf`` bucket it is the largest finite bound.
    """
    if not 0 < q <= 1:
        raise ValueError(f"quantile {q} is outside (0, 1]")
    ordered = sorted(buckets.items())
    total = observations(buckets)
    if len(ordered) < 2 or ordered[-1][0] != math.inf or total <= 0:
        return None
    rank = q * total
    index = next(i for i, (_, count) in enumerate(ordered) if count >= rank)
    upper, count = ordered[index]
    if upper == math.inf:
        return ordered[index - 1][0]
    lower, below = ordered[index - 1] if index else (0.0, 0.0)
    return lower + (upper - lower) * (rank - below) / (count - below)
