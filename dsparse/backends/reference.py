"""The reference backend: dense GEMMs on the masked weights. Exact, any device, any float dtype.

CI runs it, and it defines what every faster backend must compute.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import nm
from .base import Backend


class DenseOperands(NamedTuple):
    weight: torch.Tensor  # (out, in): M⊙W
    weight_dx: torch.Tensor | None  # (out, in): W̃, the transpose of W̃ᵀ (None: inference only)


class ReferenceBackend(Backend):
    name = "reference"

    def unsupported_reason(self, device, dtype, n, m, out_features, in_features):
        if not dtype.is_floating_point:
            return f"dtype {dtype} is not a floating-point type"
        return None

    def prepare(self, values, idx, keep_t, n, m, *, dx="sparse") -> DenseOperands:
        weight = nm.dense_from_kept(values, idx, n, m)
        if dx == "none":
            return DenseOperands(weight, None)
        return DenseOperands(weight, nm.dense_transpose_from_kept(values, idx, keep_t, n, m).t())

    def linear(self, ops: DenseOperands, x2d, bias):
        return F.linear(x2d, ops.weight, bias)

    def grad_input(self, ops: DenseOperands, dy2d):
        if ops.weight_dx is None:
            raise RuntimeError("this SparseLinear was prepared for inference only: it has no input-gradient operand")
        return dy2d.mm(ops.weight_dx)
