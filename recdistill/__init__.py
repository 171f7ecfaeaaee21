"""recdistill: staged distillation of recommender ranking models.

The Python API (``recdistill/api.py``): :func:`prepare_data`, :func:`load_run_config` or a
:class:`RunConfig` built in Python, :func:`train`, :func:`report`, :func:`export` and
:func:`load_ranker`. Names load on first use, so ``import recdistill`` stays light.
"""

import importlib
import logging
from typing import Any

# Importing torchrec trips a torch.fx notice addressed to torch's own developers.
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)

__version__ = "0.1.0"

_HOMES = {
    "RunConfig": "recdistill.config",
    "load_run_config": "recdistill.config",
    "UserTable": "recdistill.data.importer",
    "ItemTable": "recdistill.data.importer",
    "SplitSpec": "recdistill.data.prepare",
    "prepare_data": "recdistill.api",
    "train": "recdistill.api",
    "report": "recdistill.api",
    "export": "recdistill.api",
    "load_ranker": "recdistill.api",
    "Ranker": "recdistill.api",
}
__all__ = [
    "ItemTable",
    "Ranker",
    "RunConfig",
    "SplitSpec",
    "UserTable",
    "__version__",
    "export",
    "load_ranker",
    "load_run_config",
    "prepare_data",
    "report",
    "train",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'recdistill' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
