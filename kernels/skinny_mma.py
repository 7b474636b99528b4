"""A product with few tokens on the sparse tensor cores: ``x @ Aᵀ (+ bias)`` from cuSPARSELt's compressed
``A`` (:mod:`kernels.cslt_meta`), as :func:`kernels.skinny_sparse_mm` computes it, in CUDA C++.

Triton has no way to the sparse tensor cores, so :mod:`kernels.skinny` rebuilds each dense tile of
``A`` in registers and multiplies it densely; on the H200 that rebuild, not memory, bounds it
(0.4-0.8 TB/s of the operand, ``kernels_h200_skinny.json``). Here each 16 x 32 piece of ``A`` is one
``mma.sp.m16n8k32`` per 8 tokens, its kept values and metadata read from the compressed operand as
they lie, so a step moves the operand's 9/16 of the dense bytes and does nothing per weight entry. A
warp owns one or two 16-row tiles and a share of ``k`` (``warps_k`` warps per block) in spans of 128
columns: a row's span is one 128-byte line, read with 16-byte loads, and the four ``mma.sp`` of a span
take its groups in an order that makes each thread's loaded values its fragments (x read in the same
order, the metadata's nibbles gathered in registers into the instruction's layout). The block's warps
add their fp32 sums in warp order (deterministic), then the bias in fp32, rounding once (the source:
``csrc/skinny_mma.cu``). At 8 tokens on an H100 it takes 16 µs for 2048 -> 11264 against cuBLAS's
20 (``tune_h100_decode.json``, CUDA-graph timing, before :func:`launch_config`).

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

__all__ = ["skinny_mma_sparse_mm", "available", "aligned", "launch_config", "MAX_TOKENS"]

MAX_TOKENS = 16  # two token tiles of 8 (the instruction's n)
WARPS_PER_SM = 8  # fewer resident warps than this per SM left the kernel short of loads in flight (H100 sweep)
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


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache  # looked up on every call (an eager decoding step's host time): once per shape
def launch_config(rows: int, device: torch.device | str) -> dict[str, int]:
    """The kernel's ``warps_k``, ``row_tiles`` and ``batch`` for an operand of ``rows`` rows on ``device``: two
    16-row tiles per warp (one load of x serves both) and 4 warps per block where that still puts
    :data:`WARPS_PER_SM` warps on every SM, else one tile and 8 warps; one span in flight per warp. On an H100
    (30 llama-1b decode products at 1, 8 and 16 tokens, CUDA-graph timing) this came within 3% / 5% of the
    best of the 12 configurations at 8 / 16 tokens (geometric mean; 8% / 15% at worst). Shared: not to be
    modified."""
    device = torch.device(device)
    if device.type == "cuda" and rows // 32 * 4 >= WARPS_PER_SM * _sm_count(device):
        return {"warps_k": 4, "row_tiles": 2, "batch": 1}
    return {"warps_k": 8, "row_tiles": 1, "batch": 1}


def skinny_mma_sparse_mm(packed: torch.Tensor, x2d: torch.Tensor, bias: torch.Tensor | None = None, *,
                         warps_k: int | None = None, row_tiles: int | None = None, batch: int | None = None,
                         validate: bool = True) -> torch.Tensor:
    """``x2d @ Aᵀ (+ bias)`` ``(tokens, rows)`` for ``packed``, the compressed ``A`` ``(rows, cols)``, on the
    sparse tensor cores; the operands as :func:`kernels.skinny_sparse_mm` takes them, on a CUDA device
    of compute capability 8.0+, with at most :data:`MAX_TOKENS` tokens, both 16-byte aligned (:func:`aligned`).
    ``warps_k`` (1-8): warps that share each block's ``k``; ``row_tiles`` (1-2): 16-row tiles per warp;
    ``batch`` (1-2): 128-column spans a warp loads before it multiplies them; each left out: as
    :func:`launch_config` says. ``validate=False`` skips the operand checks for callers that guarantee them."""
    config = launch_config(packed.shape[0], x2d.device)
    warps_k = config["warps_k"] if warps_k is None else warps_k
    row_tiles = config["row_tiles"] if row_tiles is None else row_tiles
    batch = config["batch"] if batch is None else batch
    if validate:
        _check(packed, x2d, bias)
        if x2d.shape[0] > MAX_TOKENS:
            raise ValueError(f"skinny_mma_sparse_mm: at most {MAX_TOKENS} tokens, got {x2d.shape[0]}; "
                             f"split the tokens or use kernels.skinny_sparse_mm")
        if not aligned(packed, x2d):
            raise ValueError("skinny_mma_sparse_mm: x2d's rows and the operand are read 16 bytes at a time, so x2d's "
                             f"row stride must be a multiple of 8 elements (got {x2d.stride(0)}) and both must start "
                             "16-byte aligned; pass x2d.contiguous()")
        if not 1 <= warps_k <= 8:
            raise ValueError(f"skinny_mma_sparse_mm: warps_k must be in 1..8, got {warps_k}")
        if row_tiles not in (1, 2) or batch not in (1, 2):
            raise ValueError(f"skinny_mma_sparse_mm: row_tiles and batch must be 1 or 2, got {row_tiles}, {batch}")
        if not available(x2d.device):
            raise ValueError(f"skinny_mma_sparse_mm: needs a CUDA device with sparse tensor cores (sm80+), got "
                             f"{x2d.device}; use kernels.skinny_sparse_mm (any device) instead")
    return _op()(packed, x2d, bias, warps_k, row_tiles, batch)


def aligned(packed: torch.Tensor, x2d: torch.Tensor) -> bool:
    """Whether the kernel's 16-byte loads fit ``x2d`` (row stride a multiple of 8 elements) and both operands'
    starts (16-byte aligned)."""
    return x2d.stride(0) % 8 == 0 and x2d.data_ptr() % 16 == 0 and packed.data_ptr() % 16 == 0
