"""RMSNorm (LLaMA's, as HF ``LlamaRMSNorm`` computes it), forward and backward, one pass each.

HF's module spends ~7 elementwise kernels forward and ~10 backward per norm (fp32 upcast,
square, mean, rsqrt, two products, downcast); on a llama-1b step that is the largest
block of GPU time after the GEMMs (``bench/results/engine_h100_profile.json``). Here:

* forward: one program per row reads ``x`` once, ``rstd = 1/sqrt(mean(x²) + eps)`` in fp32,
  ``n = round(x·rstd)`` to ``x``'s dtype, ``y = round(w·n)`` to the output dtype (HF's two
  roundings, so outputs match it up to the order of the mean's sum); saves ``rstd``.
* backward: each program walks ``ROWS_PER_PROG`` rows: ``dx = rstd·(dn − x̂·mean(dn·x̂))``
  with ``dn = dy·w`` and ``x̂ = x·rstd`` (fp32), and accumulates its rows' ``dy·n`` into one
  fp32 partial row of ``dw``; the partial rows are summed by torch.
"""
from __future__ import annotations

import functools

import torch
import triton.language as tl

from ._triton import SUM, DualKernel, cdiv, check_2d, check_same_device, next_power_of_2

__all__ = ["rms_norm_forward", "rms_norm_backward", "rms_norm_reference", "NORM_DTYPES"]

NORM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_COLS = 65536  # one row per program, held in registers
_BWD_PROGRAMS_PER_SM = 4


def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, cols, sx, sy, eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    x = tl.load(x_ptr + row * sx + offs, mask=mask, other=0).to(tl.float32)
    rstd = tl.rsqrt(tl.reduce(x * x, 0, SUM) / cols + eps)
    n = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0).to(tl.float32)
    tl.store(y_ptr + row * sy + offs, (w * n).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, rows, cols, sdy, sx, sdx,
    BLOCK: tl.constexpr, ROWS_PER_PROG: tl.constexpr,
):
    pid = tl.program_id(0)
    first = pid.to(tl.int64) * ROWS_PER_PROG
    offs = tl.arange(0, BLOCK)
    cmask = offs < cols
    w = tl.load(w_ptr + offs, mask=cmask, other=0).to(tl.float32)
    dw = tl.full([BLOCK], 0.0, dtype=tl.float32)
    for i in range(ROWS_PER_PROG):  # constexpr trip count (runtime bounds trip up the interpreter)
        row = first + i
        mask = cmask & (row < rows)
        x = tl.load(x_ptr + row * sx + offs, mask=mask, other=0).to(tl.float32)
        dy = tl.load(dy_ptr + row * sdy + offs, mask=mask, other=0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row < rows, other=0)
        xhat = x * rstd
        dw += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
        dn = dy * w
        dx = (dn - xhat * (tl.reduce(dn * xhat, 0, SUM) / cols)) * rstd
        tl.store(dx_ptr + row * sdx + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + pid * cols + offs, dw, mask=cmask)


_FWD = DualKernel(_rms_norm_fwd_kernel)
_BWD = DualKernel(_rms_norm_bwd_kernel)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF ``LlamaRMSNorm.forward`` (pure torch): fp32 statistics, ``weight · round(x·rstd)``."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (2 for the CPU interpreter: a few programs suffice)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def _check(what: str, x: torch.Tensor, weight: torch.Tensor) -> int:
    check_2d(what, "x", x, dtypes=NORM_DTYPES)
    cols = x.shape[1]
    if not isinstance(weight, torch.Tensor) or weight.shape != (cols,) or weight.dtype not in NORM_DTYPES:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{what}: weight must be a fp16/bf16/fp32 tensor of shape ({cols},), got {shape}")
    if not 0 < cols <= MAX_COLS:
        raise ValueError(f"{what}: rows of {cols} features are not supported (1 to {MAX_COLS}); "
                         "use the model's own norm for wider rows")
    if x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError(f"{what}: x's rows and weight must be contiguous (call .contiguous() first)")
    return cols


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, *,
                     out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, rstd)`` of RMSNorm over the rows of ``x`` ``(rows, cols)``: ``y`` as :func:`rms_norm_reference`
    (dtype ``promote(x, weight)``), ``rstd`` fp32 ``(rows,)`` for :func:`rms_norm_backward`.

    Rows must be contiguous (any row stride). ``out``: write ``y`` there, a ``(rows, cols)`` tensor of
    ``y``'s dtype with contiguous rows at any row stride (e.g. the leading columns of a wider buffer).
    CPU tensors run through the Triton interpreter.
    """
    what = "rms_norm_forward"
    cols = _check(what, x, weight)
    rows = x.shape[0]
    dtype = torch.promote_types(x.dtype, weight.dtype)
    if out is None:
        y = torch.empty(rows, cols, dtype=dtype, device=x.device)
    else:
        check_2d(what, "out", out, (rows, cols), (dtype,))
        if out.stride(1) != 1:
            raise ValueError(f"{what}: out's rows must be contiguous (column stride 1), got strides {out.stride()}")
        y = out
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    check_same_device(what, x, weight=weight, out=out)
    if rows:
        block = next_power_of_2(cols)
        _FWD.launch(x.device, (rows,), x, weight, y, rstd, cols, x.stride(0), y.stride(0), float(eps),
                    BLOCK=block, num_warps=_num_warps(block))
    return y, rstd


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dweight)`` of :func:`rms_norm_forward` for the output gradient ``dy``.

    ``dx`` in ``x``'s dtype, ``dweight`` in ``weight``'s (summed over the rows in fp32).
    """
    what = "rms_norm_backward"
    cols = _check(what, x, weight)
    check_2d(what, "dy", dy, shape=tuple(x.shape), dtypes=NORM_DTYPES)
    if dy.stride(1) != 1:
        dy = dy.contiguous()
    rows = x.shape[0]
    if rstd.shape != (rows,) or rstd.dtype != torch.float32:
        raise ValueError(f"{what}: rstd must be the fp32 ({rows},) tensor rms_norm_forward returned")
    check_same_device(what, x, dy=dy, weight=weight, rstd=rstd)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    if rows == 0:
        return dx, torch.zeros_like(weight)
    rows_per_prog = next_power_of_2(cdiv(rows, _sm_count(x.device) * _BWD_PROGRAMS_PER_SM))
    programs = cdiv(rows, rows_per_prog)
    partial = torch.empty(programs, cols, dtype=torch.float32, device=x.device)
    block = next_power_of_2(cols)
    _BWD.launch(x.device, (programs,), dy, x, weight, rstd, dx, partial, rows, cols, dy.stride(0), x.stride(0),
                dx.stride(0), BLOCK=block, ROWS_PER_PROG=rows_per_prog, num_warps=_num_warps(block))
    return dx, partial.sum(0).to(weight.dtype)
