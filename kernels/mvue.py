"""MVUE 2:4 sparsification of the output gradient, transposed, in one pass: ``S(dYᵀ)``.

Reads ``dY`` ``(tokens, out)`` and uniform numbers ``(out, padded / 2)``; writes ``S``
``(out, padded)`` in ``dY``'s dtype, where each pair of consecutive tokens keeps one entry,
``a`` with probability ``|a| / (|a| + |b|)``, as ``sign · (|a| + |b|)`` (tokens past the
end count as zeros). The same fp32 arithmetic as :func:`dsparse.nm.mvue_pairs`, so the
result is bit-identical to it, without its fp32 temporaries of ``out x tokens``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import DualKernel, check_2d, check_same_device

__all__ = ["mvue_transpose", "mvue_transpose_reference"]

CONFIG = {"BLOCK_C": 64, "BLOCK_P": 32, "num_warps": 4}


def _mvue_transpose_kernel(
    dy_ptr, r_ptr, o_ptr, tokens, cols, pairs,
    sd0, sd1, sr0, sr1, so0, so1,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    c = (tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)[:, None]
    p = (tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)[None, :]
    inside = (c < cols) & (p < pairs)
    t0 = 2 * p
    t1 = t0 + 1
    a = tl.load(dy_ptr + t0 * sd0 + c * sd1, mask=inside & (t0 < tokens), other=0).to(tl.float32)
    b = tl.load(dy_ptr + t1 * sd0 + c * sd1, mask=inside & (t1 < tokens), other=0).to(tl.float32)
    u = tl.load(r_ptr + c * sr0 + p * sr1, mask=inside, other=0)
    mag_a = tl.abs(a)
    total = mag_a + tl.abs(b)
    positive = total > 0
    first = u < tl.where(positive, mag_a / tl.where(positive, total, 1.0), 1.0)
    kept = tl.where(first, a, b)
    value = tl.where(kept > 0, total, tl.where(kept < 0, -total, 0.0))
    if ROUND_BF16:  # round to nearest even by hand: the interpreter's bf16 cast truncates
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        value = bits.to(tl.float32, bitcast=True)
    zero = tl.full([BLOCK_C, BLOCK_P], 0.0, tl.float32)  # (tl.zeros_like is a jit function: see _triton)
    tl.store(o_ptr + c * so0 + t0 * so1, tl.where(first, value, zero).to(o_ptr.dtype.element_ty), mask=inside)
    tl.store(o_ptr + c * so0 + t1 * so1, tl.where(first, zero, value).to(o_ptr.dtype.element_ty), mask=inside)


_KERNEL = DualKernel(_mvue_transpose_kernel)


def mvue_transpose_reference(dy: torch.Tensor, rand: torch.Tensor, padded: int) -> torch.Tensor:
    """Pure torch: :func:`dsparse.nm.mvue_pairs` of ``dYᵀ`` padded with zero tokens to ``padded``."""
    from dsparse import nm

    dyt = torch.nn.functional.pad(dy, (0, 0, 0, padded - dy.shape[0])).t()
    return nm.mvue_pairs(dyt, rand)


def mvue_transpose(dy: torch.Tensor, rand: torch.Tensor, padded: int, *,
                   config: dict[str, int] | None = None) -> torch.Tensor:
    """``S(dYᵀ)`` ``(out, padded)`` from ``dy`` ``(tokens, out)`` and ``rand`` ``(out, padded / 2)`` (fp32).

    Equal to :func:`mvue_transpose_reference`. CPU tensors run through the Triton
    interpreter (slow: for tests).
    """
    what = "mvue_transpose"
    check_2d(what, "dy", dy)
    tokens, cols = dy.shape
    if padded < tokens or padded % 2:
        raise ValueError(f"{what}: padded = {padded} must be even and at least the {tokens} tokens")
    check_2d(what, "rand", rand, shape=(cols, padded // 2), dtypes=(torch.float32,))
    check_same_device(what, dy, rand=rand)
    out = torch.empty(cols, padded, dtype=dy.dtype, device=dy.device)
    if out.numel() == 0:
        return out
    cfg = {**CONFIG, **(config or {})}
    grid = (triton.cdiv(cols, cfg["BLOCK_C"]), triton.cdiv(padded // 2, cfg["BLOCK_P"]))
    _KERNEL.launch(dy.device, grid, dy, rand, out, tokens, cols, padded // 2, dy.stride(0), dy.stride(1),
                   rand.stride(0), rand.stride(1), out.stride(0), out.stride(1), **cfg,
                   ROUND_BF16=dy.dtype == torch.bfloat16)
    return out
