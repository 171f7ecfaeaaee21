"""The device a process computes on: ``--device auto|cpu|cuda[:N]``.

``auto`` (the default) is the first GPU when torch sees one, else the CPU. The CLI and the
Python API choose it once per process (:func:`use`), before anything is read, and say which
as work starts (:func:`announce`); :func:`recdistill.distributed.world`
reads the choice, so every model, frozen teacher, cached teacher answer and batch of a run
lands on it. The choice travels to worker processes (the sweep's pool, a server the A/B test
starts) in the environment variable ``RECDISTILL_DEVICE``, which a user may also set. Under
``torchrun`` each rank computes on a device of its own: ``cuda`` (or ``auto`` on a GPU
machine) is ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import os
import re
import sys

import torch

DEVICE_ENV = "RECDISTILL_DEVICE"
_NAME = re.compile(r"auto|cpu|cuda(?::(\d+))?")


def resolve(name: str | None = None) -> torch.device:
    """The device ``name`` means here (``None``: ``RECDISTILL_DEVICE``, else ``auto``); a
    ``ValueError`` saying why when it is malformed or absent from this machine."""
    name = (name or os.environ.get(DEVICE_ENV) or "auto").strip().lower()
    match = _NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"unknown device {name!r}: choose auto, cpu, cuda or cuda:N")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "no GPU visible to it"
        raise ValueError(
            f"device {name!r}: this machine has no CUDA device (torch {torch.__version__}, "
            f"{build}); use --device cpu, or auto"
        )
    if match.group(1) is not None and _ranks() > 1:
        raise ValueError(
            f"device {name!r}: under torchrun each rank computes on its own GPU "
            "(cuda:LOCAL_RANK); pass --device cuda"
        )
    index = int(match.group(1) or os.environ.get("LOCAL_RANK", "0"))
    if index >= torch.cuda.device_count():
        raise ValueError(
            f"device 'cuda:{index}': this machine has {torch.cuda.device_count()} CUDA "
            f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    return torch.device("cuda", index)


def use(name: str | None = None) -> torch.device:
    """Make ``name`` (see :func:`resolve`) this process's device, and its workers'."""
    device = resolve(name)
    # Under torchrun every rank resolves "cuda" to its own GPU.
    os.environ[DEVICE_ENV] = device.type if _ranks() > 1 else str(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def describe(device: torch.device) -> str:
    """``cpu (2 threads)`` or ``cuda:0 (NVIDIA A100-SXM4-80GB, 8 GPUs visible)``, and the
    ranks when ``torchrun`` started several."""
    if device.type == "cuda":
        text = (
            f"{device} ({torch.cuda.get_device_name(device)}, "
            f"{torch.cuda.device_count()} GPUs visible)"
        )
    else:
        threads = torch.get_num_threads()
        text = f"{device.type} ({threads} thread{'' if threads == 1 else 's'})"
    return text if _ranks() == 1 else f"{text} on each of {_ranks()} ranks"


def announce(device: torch.device) -> torch.device:
    """Print ``device`` on standard error as work on it starts (rank 0 alone)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"device: {describe(device)}", file=sys.stderr, flush=True)
    return device


def _ranks() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))
