"""The ``torch`` kind: a PyTorch module of the tensor form, built by a factory and given its
weights from a safetensors file, or handed over as an object in Python.

The module's ``forward`` names the contract's inputs it reads as keyword parameters (or takes
``**inputs``, and is given them all) and returns the ``scores`` tensor, or a dict of the
contract's outputs. It runs in eval mode without gradients; nothing is unpickled: the weights
are read with safetensors and loaded strictly, every tensor named and shaped as the module's.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from recdistill.errors import TeacherError
from recdistill.external.contract import INPUTS, SCORES


class TorchRunner:
    """``module`` called on the contract's inputs it reads, as numpy arrays in and out."""

    def __init__(self, module: nn.Module, where: str, features: tuple[str, ...]) -> None:
        if not isinstance(module, nn.Module):
            raise TeacherError(f"{where}: expected a torch.nn.Module, got {type(module).__name__}")
        module.eval()
        module.requires_grad_(False)
        self.module = module
        self.where = where
        parameters = inspect.signature(module.forward).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            self.inputs = (*INPUTS, *(f"feature_{name}" for name in features))
        else:
            self.inputs = tuple(p.name for p in parameters)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            answer = self.module(**{name: torch.from_numpy(value) for name, value in feed.items()})
        if isinstance(answer, torch.Tensor):
            answer = {SCORES: answer}
        if not isinstance(answer, Mapping):
            raise TeacherError(
                f"{self.where}: forward returned {type(answer).__name__}; the contract wants the "
                "scores tensor or a dict of named output tensors"
            )
        return {name: _numpy(value, name, self.where) for name, value in answer.items()}


def load_module(factory: str, weights: Path | str, where: str) -> tuple[nn.Module, str]:
    """The module ``factory`` (``"package.module:callable"``, or ``"path/to/file.py:callable"``)
    builds, with the safetensors ``weights`` loaded strictly; and its fingerprint."""
    module_name, _, attribute = factory.partition(":")
    try:
        if module_name.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if spec is None or not Path(module_name).is_file():
                raise FileNotFoundError(module_name)
            source = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(source)
        else:
            source = importlib.import_module(module_name)
    except (ImportError, FileNotFoundError) as error:
        raise TeacherError(f"{where}: cannot import {module_name!r}: {error}") from error
    build = getattr(source, attribute, None)
    if not callable(build):
        raise TeacherError(f"{where}: {module_name!r} has no callable {attribute!r}")
    module = build()
    if not isinstance(module, nn.Module):
        raise TeacherError(
            f"{where}: {factory} returned {type(module).__name__}, not a torch module"
        )
    weights = Path(weights)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as error:
        raise TeacherError(
            f"{where}: {weights} is not a readable safetensors file: {error}"
        ) from error
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0:2]
        raise TeacherError(
            f"{where}: {weights} does not fit {factory}: {' '.join(first)}"
        ) from error
    digest = hashlib.sha256(factory.encode())
    digest.update(weights.read_bytes())
    return module, digest.hexdigest()[:16]


def _numpy(value: object, name: str, where: str) -> np.ndarray:
    if not isinstance(value, torch.Tensor):
        raise TeacherError(f"{where}: output {name!r} is {type(value).__name__}, not a tensor")
    return value.detach().cpu().numpy()
