"""The cuSPARSELt backend: torch's ``_cslt_*`` ops on NVIDIA GPUs (sm_80 and newer).

``W`` (``(out, in)``, 2:4 along ``in``) and the double-pruned ``W̃ᵀ`` (``(in, out)``, 2:4
along ``out``) are compressed once per optimizer step. Both products put the sparse
operand first, as cuSPARSELt requires, and ask for a transposed result so that the
output comes back row-major ``(tokens, features)`` without a copy:

* forward:        ``Yᵀ = W Xᵀ``          -> ``_cslt_sparse_mm(W_c, Xᵀ, bias, transpose_result=True)``
* input gradient: ``dXᵀ = W̃ᵀ dYᵀ``      -> ``_cslt_sparse_mm(W̃ᵀ_c, dYᵀ, transpose_result=True)``

Which algorithm and layout each shape uses comes from :mod:`dsparse.backends.plans`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import nm
from .base import Backend
from .plans import Plan, plan_for

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
# cuSPARSELt's smallest tile for 16-bit types: every matrix dim a multiple of 16
_MIN_DIM = 16


class CompressedOperands(NamedTuple):
    weight: torch.Tensor  # cuSPARSELt-compressed W, (out, in)
    weight_t: torch.Tensor  # cuSPARSELt-compressed W̃ᵀ, (in, out)
    out_features: int
    in_features: int


def cusparselt_available() -> bool:
    """True when torch was built with cuSPARSELt and a CUDA GPU of compute capability >= 8.0 is visible."""
    if not torch.cuda.is_available():
        return False
    backend = getattr(torch.backends, "cusparselt", None)
    if backend is None or not backend.is_available():
        return False
    return torch.cuda.get_device_capability() >= (8, 0)


class CusparseltBackend(Backend):
    name = "cusparselt"

    def unsupported_reason(self, device, dtype, n, m, out_features, in_features):
        if device.type != "cuda":
            return f"cuSPARSELt runs on CUDA GPUs only, and this layer is on {device}"
        if not cusparselt_available():
            return "this torch build or GPU has no cuSPARSELt (needs torch with cuSPARSELt and compute capability >= 8.0)"
        if dtype not in SUPPORTED_DTYPES:
            return f"cuSPARSELt supports fp16 and bf16 here, not {dtype}; train in fp16/bf16 or use backend 'reference'"
        if m != 4 or n > 2:
            return f"cuSPARSELt runs 2:4 (and patterns inside it, like 1:4), not {n}:{m}"
        for size, what in ((out_features, "out_features"), (in_features, "in_features")):
            if size % _MIN_DIM:
                return f"{what} = {size} is not a multiple of {_MIN_DIM}, which cuSPARSELt requires"
        return None

    def prepare(self, values, idx, keep_t, n, m) -> CompressedOperands:
        weight = nm.dense_from_kept(values, idx, n, m)
        weight_t = nm.dense_transpose_from_kept(values, idx, keep_t, n, m).contiguous()
        return CompressedOperands(torch._cslt_compress(weight), torch._cslt_compress(weight_t),
                                  weight.shape[0], weight.shape[1])

    def linear(self, ops: CompressedOperands, x2d, bias):
        plan = plan_for("fwd", x2d.shape[0], ops.in_features, ops.out_features, x2d.dtype)
        return _sparse_mm(ops.weight, x2d, bias, plan)

    def grad_input(self, ops: CompressedOperands, dy2d):
        plan = plan_for("dx", dy2d.shape[0], ops.out_features, ops.in_features, dy2d.dtype)
        return _sparse_mm(ops.weight_t, dy2d, None, plan)


def _sparse_mm(packed: torch.Tensor, x2d: torch.Tensor, bias: torch.Tensor | None, plan: Plan) -> torch.Tensor:
    """``x2d @ Aᵀ (+ bias)`` for a compressed ``A``, row-major ``(tokens, rows of A)``."""
    tokens = x2d.shape[0]
    pad = (-tokens) % _MIN_DIM
    dense = torch.nn.functional.pad(x2d, (0, 0, 0, pad)) if pad else x2d
    if plan.transpose_result:
        out = torch._cslt_sparse_mm(packed, dense.t(), bias=bias, transpose_result=True, alg_id=plan.alg_id,
                                    split_k=plan.split_k)
    else:
        out = torch._cslt_sparse_mm(packed, dense.t(), alg_id=plan.alg_id, split_k=plan.split_k).t()
        if bias is not None:
            out = out + bias
        out = out.contiguous()
    return out[:tokens] if pad else out
