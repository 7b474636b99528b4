"""MVUE 2:4 sparsification of the output gradient, transposed, in one pass: ``S(dYᵀ)``.

Reads ``dY`` ``(tokens, out)``. In each pair of consecutive tokens one entry survives, ``a``
with probability ``|a| / (|a| + |b|)``, as ``sign · (|a| + |b|)`` (tokens past the end count
as zeros). The uniform draws are :func:`dsparse.nm.mvue_uniform` of a key, computed in
registers; with the same fp32 arithmetic as :func:`dsparse.nm.mvue_pairs` the results are
bit-identical to it, without its temporaries of ``out x tokens``. Two outputs:

* :func:`mvue_transpose`: ``S`` as a dense ``(out, padded)`` matrix in ``dY``'s dtype;
* :func:`mvue_compress`: ``S`` as cuSPARSELt's compressed operand (kept values and metadata,
  :mod:`kernels.cslt_meta`), ready for a sparse product, so no dense ``S`` is written and no
  ``torch._cslt_compress`` runs (that took 2.5x the dense weight-gradient GEMM on an H100).

A program owns ``BLOCK_C`` rows of ``S`` and ``BLOCK_P`` pairs: it reads ``2·BLOCK_P`` whole rows of
``dY`` (coalesced), and transposes in registers.
"""
from __future__ import annotations

import torch
import triton.language as tl

from ._triton import DualKernel, cdiv, check_2d, check_same_device
from .cslt_meta import check_shape

__all__ = ["mvue_transpose", "mvue_transpose_reference", "mvue_compress", "mvue_compress_reference",
           "mvue_compress_swiglu"]

CONFIG = {"BLOCK_C": 64, "BLOCK_P": 32, "num_warps": 4}  # GPU-tested; see bench.kernels (kernels_h100_mvue.json)
# SwiGLU's variant keeps twice the live tiles (gate, up, dh): 8 warps took 0.33 ms against 4 warps' 0.47 at llama-1b's
# 16384 x 2·5632 on an H200 (bench.kernels --sections swiglu_mvue, kernels_h200_mvue.json)
SWIGLU_CONFIG = {"BLOCK_C": 64, "BLOCK_P": 32, "num_warps": 8}


def _mvue_transpose_kernel(
    dy_ptr, o_ptr, m_ptr, key, tokens, cols, pairs,
    sd0, sd1, so0, so1, dh_ptr, dgu_ptr, sh0, sh1, sg0, sg1,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ROUND_BF16: tl.constexpr, COMPRESSED: tl.constexpr,
    INT64: tl.constexpr, SWIGLU: tl.constexpr,
):
    # tiles are (pairs, rows of S): dY's rows are read whole, along its contiguous dim; offsets in
    # int32 where every one fits (INT64 otherwise). SWIGLU: dy_ptr is a fused gate/up output [g | u]
    # (tokens, 2·cols) and dY = [dg | du] is SwiGLU's backward for dh (tokens, cols), computed here as
    # kernels.swiglu does, written to dgu_ptr, and sparsified as rows c and cols + c of S
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)[:, None]
    if INT64:
        c = c.to(tl.int64)
        p = p.to(tl.int64)
    inside = (c < cols) & (p < pairs)
    t0 = 2 * p
    t1 = t0 + 1
    in0 = inside & (t0 < tokens)
    in1 = inside & (t1 < tokens)
    if SWIGLU:  # (inlined: a DualKernel cannot call other functions)
        dt = dy_ptr.dtype.element_ty
        g0 = tl.load(dy_ptr + t0 * sd0 + c * sd1, mask=in0, other=0).to(tl.float32)
        g1 = tl.load(dy_ptr + t1 * sd0 + c * sd1, mask=in1, other=0).to(tl.float32)
        u0 = tl.load(dy_ptr + t0 * sd0 + (cols + c) * sd1, mask=in0, other=0).to(tl.float32)
        u1 = tl.load(dy_ptr + t1 * sd0 + (cols + c) * sd1, mask=in1, other=0).to(tl.float32)
        dh0 = tl.load(dh_ptr + t0 * sh0 + c * sh1, mask=in0, other=0).to(tl.float32)
        dh1 = tl.load(dh_ptr + t1 * sh0 + c * sh1, mask=in1, other=0).to(tl.float32)
        sig0 = 1 / (1 + tl.exp(-g0))
        sig1 = 1 / (1 + tl.exp(-g1))
        du0 = (dh0 * (g0 * sig0).to(dt).to(tl.float32)).to(dt)
        du1 = (dh1 * (g1 * sig1).to(dt).to(tl.float32)).to(dt)
        dg0 = (dh0 * u0 * sig0 * (1 + g0 * (1 - sig0))).to(dt)
        dg1 = (dh1 * u1 * sig1 * (1 + g1 * (1 - sig1))).to(dt)
        tl.store(dgu_ptr + t0 * sg0 + c * sg1, dg0, mask=in0)
        tl.store(dgu_ptr + t1 * sg0 + c * sg1, dg1, mask=in1)
        tl.store(dgu_ptr + t0 * sg0 + (cols + c) * sg1, du0, mask=in0)
        tl.store(dgu_ptr + t1 * sg0 + (cols + c) * sg1, du1, mask=in1)
    for half in tl.static_range(2 if SWIGLU else 1):  # SWIGLU: the gate's rows of S, then the up's
        if SWIGLU:
            row = c + half * cols
            a = (dg0 if half == 0 else du0).to(tl.float32)
            b = (dg1 if half == 0 else du1).to(tl.float32)
        else:
            row = c
            a = tl.load(dy_ptr + t0 * sd0 + c * sd1, mask=in0, other=0).to(tl.float32)
            b = tl.load(dy_ptr + t1 * sd0 + c * sd1, mask=in1, other=0).to(tl.float32)
        # the draw: nm.mvue_uniform's mix(pair ^ mix(row ^ key)) with multipliers nm.MVUE_MIX, in uint32
        # arithmetic (products wrap mod 2**32, what the reference builds from 16-bit halves)
        d = (row ^ key).to(tl.uint32)
        for apply in tl.static_range(2):
            if apply == 1:
                d = p.to(tl.uint32) ^ d
            d = d ^ (d >> 16)
            d = d * tl.full([], 0x7FEB352D, tl.uint32)
            d = d ^ (d >> 15)
            d = d * tl.full([], 0x846CA68B, tl.uint32)
            d = d ^ (d >> 16)
        u = (d >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24
        mag_a = tl.abs(a)
        total = mag_a + tl.abs(b)
        # u < |a| / total as dsparse.nm.mvue_pairs_kept decides it: a product, no division
        first = (u * total < mag_a) | (total == 0)
        kept = tl.where(first, a, b)
        value = tl.where(kept > 0, total, tl.where(kept < 0, -total, 0.0))
        if ROUND_BF16:  # round to nearest even by hand: the interpreter's bf16 cast truncates (the GPU's rounds)
            bits = value.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            value = bits.to(tl.float32, bitcast=True)
        if COMPRESSED:  # the kept value of pair p is entry p of the values row; its position goes to metadata
            tl.store(o_ptr + row * so0 + p * so1, value.to(o_ptr.dtype.element_ty), mask=inside)
            position = tl.where(first, 0, 1) + 2 * (p & 1).to(tl.int32)
            pos0, pos1 = tl.split(tl.permute(tl.reshape(position, [BLOCK_P // 2, 2, BLOCK_C]), [0, 2, 1]))
            nibble = pos0 | (pos1 << 2)  # (group, row)
            # a byte holds rows r (r // 8 even) and r + 8 of one group; kernels.cslt_meta's layout puts a block
            # of 64 rows x 8 groups in 256 consecutive bytes, at rq*64 + r8*8 + g_lo*2 + g_hi for row
            # 16*rq + r8 (+8: high nibble) and group 4*g_hi + g_lo: arranged so here, the block stores as vectors
            low, high = tl.split(tl.permute(tl.reshape(nibble, [BLOCK_P // 2, BLOCK_C // 16, 2, 8]), [0, 1, 3, 2]))
            codes = tl.reshape(low | (high << 4), [BLOCK_P // 16, 2, 4, BLOCK_C // 64, 4, 8])  # gb g_hi g_lo rb rq r8
            codes = tl.reshape(tl.permute(codes, [3, 0, 4, 5, 2, 1]), [BLOCK_C // 64, BLOCK_P * 16])
            rb = (tl.program_id(0) * (BLOCK_C // 64) + tl.arange(0, BLOCK_C // 64))[:, None]
            j = tl.arange(0, BLOCK_P * 16)[None, :]
            if INT64:
                rb = rb.to(tl.int64)
            byte = (rb + half * (cols // 64)) * (16 * pairs) + tl.program_id(1) * (BLOCK_P * 16) + j
            groups_inside = tl.program_id(1) * (BLOCK_P // 2) + (j // 256) * 8 < pairs // 2
            tl.store(m_ptr + byte, codes.to(tl.uint8), mask=(rb < cols // 64) & groups_inside)
        else:
            zero = tl.full([BLOCK_P, BLOCK_C], 0.0, tl.float32)  # (tl.zeros_like is a jit function: see _triton)
            tl.store(o_ptr + row * so0 + t0 * so1, tl.where(first, value, zero).to(o_ptr.dtype.element_ty),
                     mask=inside)
            tl.store(o_ptr + row * so0 + t1 * so1, tl.where(first, zero, value).to(o_ptr.dtype.element_ty),
                     mask=inside)


_KERNEL = DualKernel(_mvue_transpose_kernel)


def mvue_transpose_reference(dy: torch.Tensor, key: int, padded: int) -> torch.Tensor:
    """Pure torch: :func:`dsparse.nm.mvue_pairs` of ``dYᵀ`` padded with zero tokens to ``padded``,
    with the draws :func:`dsparse.nm.mvue_uniform` of ``key``."""
    from dsparse import nm

    return nm.mvue_pairs(_padded_transpose(dy, padded), nm.mvue_uniform(key, dy.shape[1], padded // 2, dy.device))


def mvue_compress_reference(dy: torch.Tensor, key: int, padded: int) -> torch.Tensor:
    """Pure torch: :func:`mvue_transpose_reference` as cuSPARSELt compresses it
    (:func:`kernels.cslt_meta.compress_reference`; a pair of zeros keeps its first entry)."""
    from dsparse import nm

    from .cslt_meta import compress_reference

    rand = nm.mvue_uniform(key, dy.shape[1], padded // 2, dy.device)
    value, first = nm.mvue_pairs_kept(_padded_transpose(dy, padded), rand)
    second_pair = torch.arange(value.shape[1], device=value.device) % 2 == 1
    return compress_reference(value, torch.where(first, 0, 1) + 2 * second_pair)


def _padded_transpose(dy: torch.Tensor, padded: int) -> torch.Tensor:
    return torch.nn.functional.pad(dy, (0, 0, 0, padded - dy.shape[0])).t()


def mvue_transpose(dy: torch.Tensor, key: int, padded: int, *,
                   config: dict[str, int] | None = None) -> torch.Tensor:
    """``S(dYᵀ)`` ``(out, padded)`` from ``dy`` ``(tokens, out)``, drawn with ``key`` (:func:`dsparse.nm.mvue_key`).

    Equal to :func:`mvue_transpose_reference`. CPU tensors run through the Triton
    interpreter (slow: for tests).
    """
    tokens, cols = _check("mvue_transpose", dy, key, padded)
    out = torch.empty(cols, padded, dtype=dy.dtype, device=dy.device)
    if out.numel():
        _launch(dy, key, padded, out, out, config, compressed=False)
    return out


def mvue_compress(dy: torch.Tensor, key: int, padded: int, *,
                  config: dict[str, int] | None = None) -> torch.Tensor:
    """``S(dYᵀ)`` as cuSPARSELt's compressed operand ``(out, padded/2 + padded/16)``: what
    ``torch._cslt_compress(mvue_transpose(dy, key, padded))`` holds, in one pass.

    ``dy``: fp16/bf16 ``(tokens, out)``; ``out`` and ``padded`` multiples of 64. Bit-identical to
    :func:`mvue_compress_reference`. CPU tensors run through the Triton interpreter (tests).
    """
    what = "mvue_compress"
    tokens, cols = _check(what, dy, key, padded)
    if dy.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"{what}: cuSPARSELt's 2:4 operands are fp16 or bf16, got {dy.dtype}")
    check_shape(what, cols, padded)
    packed, values, meta = _compressed_operand(cols, padded, dy)
    _launch(dy, key, padded, values, meta, config, compressed=True)
    return packed


def mvue_compress_swiglu(dh: torch.Tensor, gate_up: torch.Tensor, key: int, padded: int, *,
                         out: torch.Tensor | None = None,
                         config: dict[str, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU's backward and the MVUE-compressed ``S(dYᵀ)`` of its result, in one pass: ``(dgu, packed)``.

    ``gate_up``: a fused gate/up output ``[g | u]`` ``(tokens, 2·I)``; ``dh``: the gradient of
    ``silu(g) · u`` ``(tokens, I)``. ``dgu = [dg | du]`` is what :func:`kernels.silu_mul_backward` writes
    (into ``out`` when given), and ``packed`` is ``mvue_compress(dgu, key, padded)``: the weight
    gradient's sparse operand of the gate/up projection, without reading ``dgu`` back. ``I`` a
    multiple of 64; bit-identical to the two kernels on the same device.
    """
    what = "mvue_compress_swiglu"
    check_2d(what, "gate_up", gate_up, dtypes=(torch.float16, torch.bfloat16))
    check_2d(what, "dh", dh, dtypes=(gate_up.dtype,))
    tokens, width = gate_up.shape
    if width % 128 or tuple(dh.shape) != (tokens, width // 2):
        raise ValueError(f"{what}: gate_up must be (tokens, 2·I) with I a multiple of 64 and dh (tokens, I); "
                         f"got {tuple(gate_up.shape)} and {tuple(dh.shape)}")
    if out is None:
        out = torch.empty_like(gate_up)
    else:
        check_2d(what, "out", out, shape=(tokens, width), dtypes=(gate_up.dtype,))
    check_same_device(what, gate_up, dh=dh, out=out)
    _check(what, out, key, padded)
    check_shape(what, width, padded)
    packed, values, meta = _compressed_operand(width, padded, out)
    _launch(gate_up, key, padded, values, meta, config, compressed=True, swiglu=(dh, out))
    return out, packed


def _check(what: str, dy: torch.Tensor, key: int, padded: int) -> tuple[int, int]:
    from dsparse.nm import MVUE_KEY_BITS

    check_2d(what, "dy", dy)
    check_same_device(what, dy)
    tokens, cols = dy.shape
    if padded < tokens or padded % 2:
        raise ValueError(f"{what}: padded = {padded} must be even and at least the {tokens} tokens")
    if not 0 <= key < 1 << MVUE_KEY_BITS:
        raise ValueError(f"{what}: key must be in [0, 2**{MVUE_KEY_BITS}) (see dsparse.nm.mvue_key), got {key}")
    return tokens, cols


def _compressed_operand(rows: int, padded: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A compressed ``(rows, padded)`` 2:4 operand in ``like``'s dtype and device, and views of its kept
    values ``(rows, padded/2)`` and its metadata bytes, which the kernel writes."""
    packed = torch.empty(rows, padded // 2 + padded // 16, dtype=like.dtype, device=like.device)
    values = packed.view(-1)[: rows * padded // 2].view(rows, padded // 2)
    return packed, values, packed.view(torch.uint8).view(-1)[rows * padded:]


def _launch(dy: torch.Tensor, key: int, padded: int, out: torch.Tensor, meta: torch.Tensor,
            config: dict[str, int] | None, *, compressed: bool,
            swiglu: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Run the kernel; ``swiglu``: ``(dh, dgu)``, with ``dy`` the fused gate/up output it differentiates."""
    dh, dgu = swiglu if swiglu is not None else (dy, dy)  # (dy: never read or written then)
    # int64 offsets only where some offset can pass 2**31 (INT64 in ``config`` forces either, for tests)
    int64 = max(dy.numel(), dy.stride(0) * dy.shape[0], out.numel(), 2 * meta.numel(),
                dgu.stride(0) * dgu.shape[0], dh.stride(0) * dh.shape[0]) >= 2**31
    cfg = {**(CONFIG if swiglu is None else SWIGLU_CONFIG), "INT64": int64, **(config or {})}
    if cfg["BLOCK_C"] % 16 or cfg["BLOCK_P"] % 2:
        raise ValueError(f"mvue kernels: BLOCK_C must be a multiple of 16 and BLOCK_P even, got {cfg}")
    if compressed and (cfg["BLOCK_C"] % 64 or cfg["BLOCK_P"] % 16):
        raise ValueError(f"mvue_compress: BLOCK_C must be a multiple of 64 and BLOCK_P of 16 (whole blocks of "
                         f"cuSPARSELt's metadata), got {cfg}")
    tokens, cols = dh.shape if swiglu is not None else dy.shape
    grid = (cdiv(cols, cfg["BLOCK_C"]), cdiv(padded // 2, cfg["BLOCK_P"]))
    _KERNEL.launch(dy.device, grid, dy, out, meta, key, tokens, cols, padded // 2, dy.stride(0), dy.stride(1),
                   out.stride(0), out.stride(1), dh, dgu, dh.stride(0), dh.stride(1), dgu.stride(0), dgu.stride(1),
                   **cfg, ROUND_BF16=dy.dtype == torch.bfloat16 and _KERNEL.is_interpreted(dy.device),
                   COMPRESSED=compressed, SWIGLU=swiglu is not None)
