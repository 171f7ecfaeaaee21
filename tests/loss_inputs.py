"""Inputs the loss tests share: padded score lists, tensors and parameter ids."""

import math

import torch

from recdistill.losses import LOSSES

# What pad_wild fills padding with: a loss must keep these out of its result and gradients.
WILD = [1e4, -1e4, 1e30, -math.inf, math.inf, math.nan]


def variant_id(value):
    return ",".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else value


def loss_of(name, options, student, target, mask):
    return LOSSES[name](student, target, mask=mask, **options)


def tensor(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


def pad_wild(rows, size):
    """Stack 1-D tensors into ``[len(rows), size]``, padding with wild values; and the mask."""
    padded = torch.tensor(
        [[WILD[(i + j) % len(WILD)] for j in range(size)] for i in range(len(rows))],
        dtype=rows[0].dtype,
    )
    mask = torch.zeros(len(rows), size, dtype=torch.bool)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = row
        mask[i, : len(row)] = True
    return padded, mask
