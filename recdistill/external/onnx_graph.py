"""The ``onnx`` kind: an ONNX graph of the tensor form, run by ONNX Runtime on the CPU.

The form a TensorFlow-, JAX- or JVM-trained teacher arrives in. At load the graph's inputs
are checked against the contract (names, int64, a free batch dimension, a history as wide as
the run's ``history_length`` or free) and its ``scores`` output must be float32; every call's
outputs are checked for shape (``recdistill.external.tensor``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from recdistill.errors import MissingExtra, TeacherError
from recdistill.external.contract import HISTORY, HISTORY_TIME, SCORES

INT64 = "tensor(int64)"
FLOAT = "tensor(float)"


class OnnxRunner:
    """An ONNX Runtime session over the graph at ``path``."""

    def __init__(self, path: Path | str, where: str, history_length: int, threads: int) -> None:
        try:
            import onnxruntime
        except ImportError as error:
            raise MissingExtra(
                "ONNX teachers need onnxruntime: pip install 'recdistill[onnx]'"
            ) from error
        path = Path(path)
        if not path.is_file():
            raise TeacherError(f"{where}: ONNX graph {path} not found")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self.session = onnxruntime.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # ONNX Runtime raises its own exception types
            raise TeacherError(f"{where}: ONNX Runtime cannot load {path}: {error}") from error
        self.where = where
        self.inputs = tuple(node.name for node in self.session.get_inputs())
        for node in self.session.get_inputs():
            if node.type != INT64:
                raise TeacherError(
                    f"{where}: input {node.name!r} is {node.type}; the contract gives {INT64}"
                )
            if node.shape and isinstance(node.shape[0], int):
                raise TeacherError(
                    f"{where}: input {node.name!r} has a fixed batch of {node.shape[0]} lists; "
                    "export it with a free (dynamic) first dimension"
                )
            if node.name in (HISTORY, HISTORY_TIME) and len(node.shape) == 2:
                width = node.shape[1]
                if isinstance(width, int) and width != history_length:
                    raise TeacherError(
                        f"{where}: input {node.name!r} is {width} items wide; the run sends "
                        f"history_length = {history_length} (make it free or that width)"
                    )
        outputs = {node.name: node for node in self.session.get_outputs()}
        if SCORES not in outputs:
            raise TeacherError(
                f"{where}: gives no output named {SCORES!r} (it gives {sorted(outputs)})"
            )
        if outputs[SCORES].type != FLOAT:
            raise TeacherError(
                f"{where}: output {SCORES!r} is {outputs[SCORES].type}; the contract gives {FLOAT}"
            )
        self.outputs = tuple(outputs)
        self.fingerprint = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        self.params = _initializer_size(path)

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(None, feed)
        except Exception as error:  # ONNX Runtime raises its own exception types
            raise TeacherError(f"{self.where}: ONNX Runtime failed: {error}") from error
        return dict(zip(self.outputs, values, strict=True))


def _initializer_size(path: Path) -> int:
    """The number of weights the graph holds (its initializers' elements)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return int(sum(np.prod(tensor.dims, dtype=np.int64) for tensor in graph.initializer))
