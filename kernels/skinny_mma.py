"""A product with few tokens on the sparse tensor cores: ``x @ Aᵀ (+ bias)`` from cuSPARSELt's compressed
``A`` (:mod:`kernels.cslt_meta`), as :func:`kernels.skinny_sparse_mm` computes it, in CUDA C++.

Triton has no way to the sparse tensor cores, so :mod:`kernels.skinny` rebuilds each dense tile of
``A`` in registers and multiplies it densely; on the H200 that rebuild, not memory, bounds it
(0.4-0.8 TB/s of the operand, ``kernels_h200_skinny.json``). Here each 16 x 32 piece of ``A`` is one
``mma.sp.m16n8k32`` per 8 tokens, its kept values and metadata read from the compressed operand as
they lie (the metadata's nibbles reordered in registers into the instruction's layout), so a step
moves the operand's 9/16 of the dense bytes and does nothing per weight entry. A warp owns 16 rows
and a share of ``k`` (``warps_k`` warps per block), loads 8 chunks of ``A`` before multiplying them,
and the block's warps add their fp32 sums in warp order (deterministic), then the bias in fp32,
rounding once (the source: ``csrc/skinny_mma.cu``).

CUDA only (sm80+), up to :data:`MAX_TOKENS` tokens. The extension is built with
``torch.utils.cpp_extension`` on first use (tens of seconds, cached under ``TORCH_EXTENSIONS_DIR``)
and registers ``torch.ops.dsparse_mma.skinny_mma``; the CPU path of the same product is
:func:`kernels.skinny_sparse_mm` (interpreted) or its reference.
"""
from __future__ import annotations

import functools
import os

import torch

from .skinny import _check

__all__ = ["skinny_mma_sparse_mm", "available", "MAX_TOKENS", "WARPS_K"]

MAX_TOKENS = 16  # two token tiles of 8 (the instruction's n)
WARPS_K = 8  # warps per block sharing a tile's k (a guess until bench.kernels' sweep on a GPU)
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "skinny_mma.cu")


def available(device: torch.device | str) -> bool:
    """Whether this kernel runs on ``device``: CUDA with sparse tensor cores (compute capability 8.0+)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)


@functools.cache
def _op():
    """``torch.ops.dsparse_mma.skinny_mma``, building and loading the extension the first time."""
    from torch.utils.cpp_extension import load

    load(name="dsparse_skinny_mma", sources=[SOURCE], extra_cuda_cflags=["-O3"],
         is_python_module=False, verbose=False)
    return torch.ops.dsparse_mma.skinny_mma


def skinny_mma_sparse_mm(packed: torch.Tensor, x2d: torch.Tensor, bias: torch.Tensor | None = None, *,
                         warps_k: int = WARPS_K, validate: bool = True) -> torch.Tensor:
    """``x2d @ Aᵀ (+ bias)`` ``(tokens, rows)`` for ``packed``, the compressed ``A`` ``(rows, cols)``, on the
    sparse tensor cores; the operands as :func:`kernels.skinny_sparse_mm` takes them, on a CUDA device
    of compute capability 8.0+, with at most :data:`MAX_TOKENS` tokens and an even row stride of
    ``x2d``. ``warps_k`` (1-8): warps that share each 16-row tile's ``k``. ``validate=False`` skips the
    operand checks for callers that guarantee them."""
    if validate:
        _check(packed, x2d, bias)
        if x2d.shape[0] > MAX_TOKENS:
            raise ValueError(f"skinny_mma_sparse_mm: at most {MAX_TOKENS} tokens, got {x2d.shape[0]}; "
                             f"split the tokens or use kernels.skinny_sparse_mm")
        if x2d.stride(0) % 2 or x2d.data_ptr() % 4:
            raise ValueError("skinny_mma_sparse_mm: x2d's rows are read in pairs of elements, so its row stride "
                             f"must be even and its start 4-byte aligned (got stride {x2d.stride(0)}); "
                             "pass x2d.contiguous()")
        if not 1 <= warps_k <= 8:
            raise ValueError(f"skinny_mma_sparse_mm: warps_k must be in 1..8, got {warps_k}")
        if not available(x2d.device):
            raise ValueError(f"skinny_mma_sparse_mm: needs a CUDA device with sparse tensor cores (sm80+), got "
                             f"{x2d.device}; use kernels.skinny_sparse_mm (any device) instead")
    return _op()(packed, x2d, bias, warps_k)
