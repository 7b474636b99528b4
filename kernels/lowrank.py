"""SLoPe's low-rank adapter added onto the sparse GEMM's output, fused: ``y + scale * (u @ bᵀ) (+ bias)``.

``u = x @ aᵀ`` ``(T, r)`` is computed beforehand (r is small); this kernel does the
second, wide product and the add in one pass over ``y``: each program loads a
``BLOCK_T x BLOCK_N`` tile of ``y`` once, accumulates ``u @ bᵀ`` for it in fp32 (r in
chunks of ``BLOCK_R``, masked, so any r works), adds bias, and writes the tile once in
``y``'s dtype (no intermediate rounding: bf16 never goes through fp16).

:func:`lowrank_silu_mul` is the same pass over a fused gate/up output ``[g | u]`` with the
SwiGLU gate as its epilogue: ``silu(g') · u'`` of the adapted halves, so an inference
prefill with gate/up adapters writes ``h`` alone instead of writing ``[g' | u']`` and
reading it back (two passes over ``T x 2·intermediate``).
"""
from __future__ import annotations

import torch
import triton.language as tl

from ._triton import DualKernel, cdiv, check_2d, check_same_device, next_power_of_2

__all__ = ["lowrank_addmm", "lowrank_addmm_reference", "lowrank_silu_mul", "bias_add", "bias_add_reference",
           "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# tensor-core path (fp16 x fp16, bf16 x bf16): r in chunks of up to 64 (r <= 64: one chunk,
# padded to 16 or the next power of two); full-fp32 path (FMA): smaller tiles, r in chunks of 16
CONFIG = {"BLOCK_T": 128, "BLOCK_N": 128, "num_warps": 8}
CONFIG_FP32 = {"BLOCK_T": 64, "BLOCK_N": 128, "num_warps": 8}
# lowrank_silu_mul holds two accumulators: on an H200 at 16384 x 2·5632, r = 64, 64x64 tiles x 4 warps ran
# 0.225 ms (CONFIG's 0.376 ms; lowrank_addmm then silu_mul_forward 0.362 ms), r = 256 0.359 ms (0.471 ms)
CONFIG_GATED = {"BLOCK_T": 64, "BLOCK_N": 64, "num_warps": 4}
MAX_BLOCK_R = 64
BLOCK_R_FP32 = 16


def _lowrank_addmm_kernel(
    y_ptr, u_ptr, b_ptr, bias_ptr, o_ptr,
    T, N, R, scale,
    sy0, sy1, su0, su1, sb0, sb1, so0, so1,
    HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, GATED: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNKS: tl.constexpr,
):
    # GATED: y is [g | u] (T, 2N) and b (2N, R); the output is silu(g') · u' (T, N), each half
    # rounded to y's dtype first (what lowrank_addmm then silu_mul_forward compute)
    rt = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # T * out may pass 2**31
    rn = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mt = rt < T
    mn = rn < N
    acc = tl.full([BLOCK_T, BLOCK_N], 0.0, dtype=tl.float32)
    acc_up = acc
    if HAS_LR:
        for chunk in range(R_CHUNKS):  # constexpr trip count (runtime bounds trip up the interpreter)
            rr = chunk * BLOCK_R + tl.arange(0, BLOCK_R)
            mr = rr < R
            u = tl.load(u_ptr + rt[:, None] * su0 + rr[None, :] * su1, mask=mt[:, None] & mr[None, :], other=0)
            bt = tl.load(b_ptr + rn[None, :] * sb0 + rr[:, None] * sb1, mask=mr[:, None] & mn[None, :], other=0)
            if IEEE:  # fp32 (or mixed) operands: full fp32 products, no TF32
                acc = tl.dot(u.to(tl.float32), bt.to(tl.float32), acc, input_precision="ieee")
            else:  # fp16 x fp16 or bf16 x bf16: exact products, fp32 accumulation
                acc = tl.dot(u, bt, acc)
            if GATED:
                bt = tl.load(b_ptr + (N + rn[None, :]) * sb0 + rr[:, None] * sb1, mask=mr[:, None] & mn[None, :],
                             other=0)
                if IEEE:
                    acc_up = tl.dot(u.to(tl.float32), bt.to(tl.float32), acc_up, input_precision="ieee")
                else:
                    acc_up = tl.dot(u, bt, acc_up)
        acc = acc * scale
        acc_up = acc_up * scale
    mask = mt[:, None] & mn[None, :]
    y = tl.load(y_ptr + rt[:, None] * sy0 + rn[None, :] * sy1, mask=mask, other=0).to(tl.float32)
    res = y + acc
    if HAS_BIAS:
        res = res + tl.load(bias_ptr + rn, mask=mn, other=0).to(tl.float32)[None, :]
    if GATED:  # silu(g') · u' as kernels.swiglu computes it from the rounded halves
        up = tl.load(y_ptr + rt[:, None] * sy0 + (N + rn[None, :]) * sy1, mask=mask, other=0).to(tl.float32)
        up = (up + acc_up).to(o_ptr.dtype.element_ty).to(tl.float32)
        g = res.to(o_ptr.dtype.element_ty).to(tl.float32)
        res = (g / (1 + tl.exp(-g))).to(o_ptr.dtype.element_ty).to(tl.float32) * up
    tl.store(o_ptr + rt[:, None] * so0 + rn[None, :] * so1, res.to(o_ptr.dtype.element_ty), mask=mask)


_KERNEL = DualKernel(_lowrank_addmm_kernel)


def lowrank_addmm_reference(y: torch.Tensor, u: torch.Tensor | None, b: torch.Tensor | None, scale: float = 1.0,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch ``y + scale * (u @ bᵀ) (+ bias)``, computed in fp32 and rounded once to ``y``'s dtype."""
    res = y.float()
    if u is not None and u.shape[-1] > 0:
        res = res + scale * (u.float() @ b.float().t())
    if bias is not None:
        res = res + bias.float()
    return res.to(y.dtype)


def bias_add_reference(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Pure-torch ``y + bias`` in fp32, rounded once to ``y``'s dtype."""
    return lowrank_addmm_reference(y, None, None, bias=bias)


def _launch(what: str, y: torch.Tensor, u: torch.Tensor | None, b: torch.Tensor | None, scale: float,
            bias: torch.Tensor | None, out: torch.Tensor | None, inplace: bool,
            config: dict[str, int] | None, gated: bool = False) -> torch.Tensor:
    check_2d(what, "y", y, dtypes=FLOAT_DTYPES)
    tokens, n = y.shape
    if gated and n % 2:
        raise ValueError(f"{what}: y must be a fused gate/up output [g | u] of even width, got {n} columns")
    rank = 0
    if u is not None:
        check_2d(what, "u", u, dtypes=FLOAT_DTYPES)
        check_2d(what, "b", b, dtypes=FLOAT_DTYPES)
        rank = u.shape[1]
        if u.shape[0] != tokens:
            raise ValueError(f"{what}: u has {u.shape[0]} rows but y has {tokens} (u is (T, r), y is (T, out))")
        if tuple(b.shape) != (n, rank):
            raise ValueError(f"{what}: b must have shape (out, r) = {(n, rank)}, got {tuple(b.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.shape[0] != n:
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"{what}: bias must have shape (out,) = ({n},), got {shape}")
        if bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{what}: bias must be fp16/bf16/fp32, got {bias.dtype}")
    if inplace:
        if out is not None and out is not y:
            raise ValueError(f"{what}: give either inplace=True or out=, not both")
        out = y
    width = n // 2 if gated else n
    if out is None:
        out = torch.empty(tokens, width, dtype=y.dtype, device=y.device)
    else:
        check_2d(what, "out", out, shape=(tokens, width), dtypes=(y.dtype,))
    check_same_device(what, y, u=u, b=b, bias=bias, out=out)
    if out.numel() == 0:
        return out
    has_lr = rank > 0
    ieee = has_lr and not (u.dtype == b.dtype and u.dtype in (torch.float16, torch.bfloat16))
    cfg = {**(CONFIG_FP32 if ieee else CONFIG_GATED if gated else CONFIG), **(config or {})}
    block_r = BLOCK_R_FP32 if ieee else min(MAX_BLOCK_R, max(16, next_power_of_2(rank)))
    if has_lr and u.dtype == torch.bfloat16 and _KERNEL.is_interpreted(y.device):
        ieee = True  # the interpreter's tl.dot multiplies bf16 bit patterns as integers; same math in fp32
    dummy = y  # stands in for absent pointers (never read)
    grid = (cdiv(tokens, cfg["BLOCK_T"]), cdiv(width, cfg["BLOCK_N"]))
    _KERNEL.launch(y.device, grid,
                   y, u if has_lr else dummy, b if has_lr else dummy, bias if bias is not None else dummy, out,
                   tokens, width, rank, float(scale),
                   y.stride(0), y.stride(1),
                   u.stride(0) if has_lr else 0, u.stride(1) if has_lr else 0,
                   b.stride(0) if has_lr else 0, b.stride(1) if has_lr else 0,
                   out.stride(0), out.stride(1),
                   HAS_LR=has_lr, HAS_BIAS=bias is not None, IEEE=ieee, GATED=gated, BLOCK_R=block_r,
                   R_CHUNKS=cdiv(rank, block_r), **cfg)
    return out


def lowrank_addmm(y: torch.Tensor, u: torch.Tensor, b: torch.Tensor, scale: float = 1.0,
                  bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None, inplace: bool = False,
                  config: dict[str, int] | None = None) -> torch.Tensor:
    """``y + scale * (u @ bᵀ) (+ bias)`` in one pass, fp32 accumulation, result in ``y``'s dtype.

    ``y`` ``(T, out)``, ``u`` ``(T, r)`` (``= x @ aᵀ``), ``b`` ``(out, r)``, ``bias``
    ``(out,)``; fp16/bf16/fp32 each, any strides, any r >= 0 (masked in-kernel; r = 0
    adds just the bias). fp16 x fp16 and bf16 x bf16 products run on tensor cores (exact
    products, fp32 sums); fp32 or mixed operands in full fp32 (no TF32). ``inplace=True``
    writes into ``y`` (safe: each tile is read before it is written), ``out=`` into a given
    tensor of ``y``'s shape and dtype. Not differentiable (no autograd graph): call it
    inside the layer's ``autograd.Function``. CPU tensors run through the Triton
    interpreter (slow: for tests; there the bf16 product runs in fp32 and the final
    rounding to bf16 truncates, so CPU results may differ from the GPU's by 1 ulp).
    ``config`` overrides :data:`CONFIG` (:data:`CONFIG_FP32` on the fp32 path).
    """
    if u is None or b is None:
        raise ValueError("lowrank_addmm: u and b are required (use bias_add for the bias alone)")
    return _launch("lowrank_addmm", y, u, b, scale, bias, out, inplace, config)


def lowrank_silu_mul(y: torch.Tensor, u: torch.Tensor, b: torch.Tensor, scale: float = 1.0, *,
                     out: torch.Tensor | None = None, config: dict[str, int] | None = None) -> torch.Tensor:
    """SwiGLU's ``silu(g') · u'`` of ``[g' | u'] = lowrank_addmm(y, u, b, scale)``, in one pass.

    ``y`` ``(T, 2·N)``: a fused gate/up output ``[g | u]``; ``u`` ``(T, r)``; ``b`` ``(2·N, r)``
    (the gate's rows, then the up's); result ``(T, N)``. Bit-identical to
    ``silu_mul_forward(*lowrank_addmm(y, u, b, scale).chunk(2, -1))`` on the same device.
    ``config`` overrides :data:`CONFIG_GATED` (:data:`CONFIG_FP32` on the fp32 path).
    """
    if u is None or b is None:
        raise ValueError("lowrank_silu_mul: u and b are required (use kernels.silu_mul_forward without adapters)")
    return _launch("lowrank_silu_mul", y, u, b, scale, None, out, False, config, gated=True)


def bias_add(y: torch.Tensor, bias: torch.Tensor, *, out: torch.Tensor | None = None, inplace: bool = False,
             config: dict[str, int] | None = None) -> torch.Tensor:
    """``y + bias`` (``y`` ``(T, out)``, ``bias`` ``(out,)``) in fp32, rounded once to ``y``'s dtype.

    The r = 0 path of :func:`lowrank_addmm`; same ``out=`` / ``inplace=`` semantics.
    """
    if bias is None:
        raise ValueError("bias_add: bias is required")
    return _launch("bias_add", y, None, None, 1.0, bias, out, inplace, config)
