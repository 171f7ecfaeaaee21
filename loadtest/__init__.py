"""Locust load tests that hold the ranking endpoint to its latency budget.

- ``workload``: the ``/rank`` requests (sampled from an artifact's vocabularies) and the
  checks each answer must pass;
- ``locustfile``: the Locust user sending them; ``client_stats``: what it measured;
- ``server_metrics``: the server's latency histogram from ``/metrics``;
- ``runner``: one headless run and its gate; ``python -m loadtest`` runs it from the shell.
- ``capacity``: the highest request rate that holds the p99 budget;
- ``reloads``, ``soak``, ``soak_stats``: minutes of load at a fixed rate while the model is
  hot-reloaded, judged per minute (``benchmarks/soak.py``).
"""

from importlib.util import find_spec

from recdistill.errors import MissingExtra

# Only the load test needs Locust and what it runs on: they are an extra of the project.
_MISSING = [name for name in ("locust", "gevent", "psutil") if find_spec(name) is None]
if _MISSING:
    raise MissingExtra(
        f"the load test needs {', '.join(_MISSING)}: pip install 'recdistill[loadtest]'"
    )
