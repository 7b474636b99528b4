"""An adapter's first product for a few tokens: ``u = x @ aᵀ`` (``a`` ``(r, in)``, r small), and optionally
``x`` copied on in the same pass.

A folded product's wide input ``[X | U']`` (:mod:`dsparse.nn.adapter_fold`) needs ``U' = X A'ᵀ`` before its
sparse GEMM. At a decoding step's 8 tokens cuBLAS runs that as one thread block walking all of ``in``
(~5 µs on an H100 for 8 x 2048 x 64, four per llama-1b layer: more than the sparse products save).
Here each program owns ``BLOCK_R`` of the r outputs for ``BLOCK_T`` tokens, so r = 64 spreads the read
of ``a`` over four SMs; ``x_copy`` writes ``x`` into the wide input's ``X`` slot from the tiles already
loaded (a producer that cannot write there itself costs no extra copy kernel).
"""
from __future__ import annotations

import torch
import triton.language as tl

from ._triton import DualKernel, cdiv, check_2d, check_same_device

__all__ = ["lowrank_project", "lowrank_project_reference", "MAX_TOKENS", "FLOAT_DTYPES"]

MAX_TOKENS = 64  # beyond a few token tiles cuBLAS's own tiling wins (dsparse uses torch.mm there)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CONFIG = {"BLOCK_T": 16, "BLOCK_R": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3}


def _lowrank_project_kernel(
    x_ptr, a_ptr, o_ptr, c_ptr,
    T, K, R,
    sx0, sx1, sa0, sa1, so0, so1, sc0, sc1,
    COPY: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, K_CHUNKS: tl.constexpr,
):
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rt = (tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    mr = rr < R
    mt = rt < T
    copy_rows = mt & (tl.program_id(0) == 0)  # the first column block copies x on
    acc = tl.full([BLOCK_T, BLOCK_R], 0.0, dtype=tl.float32)
    for chunk in range(K_CHUNKS):  # constexpr trip count (runtime bounds trip up the interpreter)
        rk = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
        mk = rk < K
        xt = tl.load(x_ptr + rt[:, None] * sx0 + rk[None, :] * sx1, mask=mt[:, None] & mk[None, :], other=0)
        at = tl.load(a_ptr + rr[None, :] * sa0 + rk[:, None] * sa1, mask=mk[:, None] & mr[None, :], other=0)
        if COPY:
            tl.store(c_ptr + rt[:, None] * sc0 + rk[None, :] * sc1, xt, mask=copy_rows[:, None] & mk[None, :])
        if IEEE:  # fp32 operands, or bf16 in the interpreter (its tl.dot multiplies bf16 bit patterns)
            acc = tl.dot(xt.to(tl.float32), at.to(tl.float32), acc, input_precision="ieee")
        else:  # fp16 x fp16 or bf16 x bf16 on tensor cores: exact products, fp32 sums
            acc = tl.dot(xt, at, acc)
    tl.store(o_ptr + rt[:, None] * so0 + rr[None, :] * so1, acc.to(o_ptr.dtype.element_ty),
             mask=mt[:, None] & mr[None, :])


_KERNEL = DualKernel(_lowrank_project_kernel)


def lowrank_project_reference(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Pure-torch ``x @ aᵀ`` in fp32, rounded once to ``x``'s dtype."""
    return (x.float() @ a.float().t()).to(x.dtype)


def lowrank_project(x: torch.Tensor, a: torch.Tensor, *, out: torch.Tensor | None = None,
                    x_copy: torch.Tensor | None = None, config: dict[str, int] | None = None) -> torch.Tensor:
    """``x @ aᵀ`` for ``x`` ``(T, in)`` and ``a`` ``(r, in)`` of one dtype (fp16/bf16/fp32), fp32 sums rounded
    once; into ``out`` ``(T, r)`` when given (any strides: a column slice of a wide input). ``x_copy``
    ``(T, in)``: also written with ``x`` (bit for bit). Meant for few tokens (up to :data:`MAX_TOKENS`, any
    count works); no autograd graph. CPU tensors run through the Triton interpreter (tests)."""
    check_2d("lowrank_project", "x", x, dtypes=FLOAT_DTYPES)
    tokens, k = x.shape
    check_2d("lowrank_project", "a", a, dtypes=(x.dtype,))
    if a.shape[1] != k:
        raise ValueError(f"lowrank_project: a must have shape (r, in) with in = {k} (x's columns), "
                         f"got {tuple(a.shape)}")
    rank = a.shape[0]
    if out is None:
        out = torch.empty(tokens, rank, dtype=x.dtype, device=x.device)
    else:
        check_2d("lowrank_project", "out", out, shape=(tokens, rank), dtypes=(x.dtype,))
    if x_copy is not None:
        check_2d("lowrank_project", "x_copy", x_copy, shape=(tokens, k), dtypes=(x.dtype,))
    check_same_device("lowrank_project", x, a=a, out=out, x_copy=x_copy)
    if tokens == 0 or rank == 0:
        if x_copy is not None:
            x_copy.copy_(x)
        return out.zero_()
    cfg = {**CONFIG, **(config or {})}
    ieee = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _KERNEL.is_interpreted(x.device))
    copy = x_copy if x_copy is not None else out  # stands in when absent (never written)
    grid = (cdiv(rank, cfg["BLOCK_R"]), cdiv(tokens, cfg["BLOCK_T"]))
    _KERNEL.launch(x.device, grid, x, a, out, copy, tokens, k, rank,
                   x.stride(0), x.stride(1), a.stride(0), a.stride(1), out.stride(0), out.stride(1),
                   copy.stride(0), copy.stride(1),
                   COPY=x_copy is not None, IEEE=ieee, K_CHUNKS=cdiv(k, cfg["BLOCK_K"]), **cfg)
    return out
