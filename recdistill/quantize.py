"""Post-training int8 compression of a trained two-tower model, and its safetensors form.

Two independent steps, chosen by :class:`QuantizationSpec`:

- ``embeddings``: every embedding-bag table becomes row-wise int8, torchrec's quantized
  ``EmbeddingBagCollection`` on fbgemm's int8 kernels. Each row keeps 8-bit codes and an
  fp16 scale and offset of its own: ``value = code * scale + offset``.
- ``linear``: the towers' MLP ``nn.Linear`` layers become dynamically quantized int8 layers
  (weights int8 per output channel, activations quantized on the fly).

The per-item bias stays float: one number per item, and it adds straight to the score. So
does a sequence user encoder (``model.user_tower.sequence``: its ``EmbeddingCollection``,
position embeddings and attention layers): its history table is not an embedding bag and
its attention is not part of the tower's MLP, so an int8 sequence model has int8 user-ID and
demographic bags, item tower and MLPs, and a float sequence encoder.

A quantized model's state is stored as plain tensors (:func:`plain_state`), so artifacts
stay pickle-free safetensors. A loader builds the float model from its spec, quantizes it the
same way and loads that state (:func:`load_plain_state`); for a float model both functions
are its ordinary ``state_dict``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
from torchrec import EmbeddingBagCollection
from torchrec.inference.modules import quantize_embeddings
from torchrec.quant.embedding_modules import (
    quant_prep_customize_row_alignment,
    quant_prep_enable_quant_state_dict_split_scale_bias,
)

from recdistill.data.feature_store import UNKNOWN
from recdistill.models import TwoTower

INT8_BITS = 8
# fbgemm pads int8 rows to 16 bytes by default, for GPU loads; on CPU unpadded rows work and
# keep a 16-d table at 20 bytes a row (codes + fp16 scale + fp16 offset) instead of 32.
ROW_ALIGNMENT = 1
# Suffixes of a dynamic int8 linear layer's weight in the plain state.
CODES, SCALES, ZERO_POINTS = "weight_int8", "weight_scale", "weight_zero_point"


@dataclass(frozen=True)
class QuantizationSpec:
    """Which parts of a trained model become int8 (a sweep's ``[quantization]``, spec.json)."""

    embeddings: bool = True
    linear: bool = True

    def describe(self) -> str:
        steps = (("int8 embeddings", self.embeddings), ("int8 linear", self.linear))
        return " + ".join(name for name, chosen in steps if chosen) or "float"


def quantize(model: TwoTower, spec: QuantizationSpec) -> TwoTower:
    """An int8 copy of ``model`` in eval mode, on the CPU (its int8 kernels are CPU ones);
    ``model`` itself is left as it is."""
    model = copy.deepcopy(model).cpu().eval()
    with _quiet():
        for tower in (model.user_tower, model.item_tower):
            if spec.embeddings:
                quant_prep_enable_quant_state_dict_split_scale_bias(tower.embeddings)
                quant_prep_customize_row_alignment(tower, [EmbeddingBagCollection], ROW_ALIGNMENT)
                quantize_embeddings(tower, dtype=torch.qint8, inplace=True)
            if spec.linear:
                qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
                torch.ao.quantization.quantize_dynamic(
                    tower.mlp, {nn.Linear: qconfig}, dtype=torch.qint8, inplace=True
                )
    return model


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as plain tensors for safetensors: int8 codes with their scales."""
    linears = dict(_dynamic_linears(model))
    state = {
        key: value.detach().clone().contiguous()
        for key, value in model.state_dict().items()
        if not _belongs_to(key, linears)
    }
    for name, layer in linears.items():
        weight = layer.weight()
        state[f"{name}.{CODES}"] = weight.int_repr().contiguous()
        state[f"{name}.{SCALES}"] = weight.q_per_channel_scales().contiguous()
        state[f"{name}.{ZERO_POINTS}"] = weight.q_per_channel_zero_points().contiguous()
        state[f"{name}.bias"] = layer.bias().detach().clone()
    return state


def load_plain_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load :func:`plain_state` output into a model quantized like the one it came from."""
    linears = dict(_dynamic_linears(model))
    rest = dict(state)
    with _quiet():
        for name, layer in linears.items():
            codes, scales = rest.pop(f"{name}.{CODES}"), rest.pop(f"{name}.{SCALES}")
            zero_points = rest.pop(f"{name}.{ZERO_POINTS}")
            # The codes times their scales are exact multiples: quantizing them again
            # gives back exactly the stored codes.
            values = (codes.double() - zero_points[:, None]) * scales[:, None]
            weight = torch.quantize_per_channel(values.float(), scales, zero_points, 0, torch.qint8)
            layer.set_weight_bias(weight, rest.pop(f"{name}.bias"))
    own = model.state_dict()
    expected = {key for key in own if not _belongs_to(key, linears)}
    if set(rest) != expected:
        raise ValueError(
            f"state does not fit the model: missing {sorted(expected - set(rest))[:3]}, "
            f"unexpected {sorted(set(rest) - expected)[:3]}"
        )
    own.update(rest)  # in place: the state's metadata tells quantized layers their format
    model.load_state_dict(own)


def set_unknown_row_to_mean(table: nn.Module) -> None:
    """Overwrite row 0 (unknown) of an embedding table with the mean of the other rows.

    An int8 table gets the mean of its dequantized rows, quantized with a scale and offset
    of its own, as every row has.
    """
    if not hasattr(table, "weight_qscale"):
        table.weight[UNKNOWN] = table.weight[1:].mean(0)
        return
    rows = table.weight[1:].float() * table.weight_qscale[1:].float()
    mean = (rows + table.weight_qbias[1:].float()).mean(0, keepdim=True)
    fused = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(mean, INT8_BITS)
    scale, offset = fused[0, -4:].view(torch.float16)
    table.weight[UNKNOWN] = fused[0, :-4]
    table.weight_qscale[UNKNOWN] = scale
    table.weight_qbias[UNKNOWN] = offset


def _dynamic_linears(model: nn.Module) -> Iterator[tuple[str, DynamicInt8Linear]]:
    for name, module in model.named_modules():
        if isinstance(module, DynamicInt8Linear):
            yield name, module


def _belongs_to(key: str, modules: dict[str, nn.Module]) -> bool:
    return any(key.startswith(f"{name}.") for name in modules)


@contextmanager
def _quiet() -> Iterator[None]:
    # torch.ao's eager-mode quantization warns that it is deprecated in favour of torchao,
    # which is not a dependency here; the API works on this torch pin, the warnings are noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, message=".*quantize_per")
        yield
