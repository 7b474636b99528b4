"""SwiGLU's gate, ``h = silu(g) · u`` (LLaMA's MLP between its up and down projections), forward and
backward in one pass each.

HF's ``LlamaMLP`` runs ``act_fn(gate) * up`` as two kernels forward and four backward over the
``(tokens, intermediate)`` activations. Here the forward reads ``g`` and ``u`` once and writes
``h`` (rounding ``silu(g)`` to the input dtype first, as HF does); the backward recomputes
``silu`` from ``g`` and writes ``dg`` and ``du`` in one pass, all arithmetic in fp32.

``g`` and ``u`` may also be rows of a wider matrix (``(T, W)`` views at a row stride ``S``), as
the two halves of a fused gate/up projection's output are; the backward can then write ``dg``
and ``du`` into the halves of one gradient buffer, so no copy joins or splits them.
"""
from __future__ import annotations

import torch
import triton.language as tl

from ._triton import DualKernel, cdiv, check_same_device

__all__ = ["silu_mul_forward", "silu_mul_backward", "silu_mul_reference"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CONFIG = {"BLOCK": 4096, "num_warps": 8}


def _silu_mul_fwd_kernel(g_ptr, u_ptr, h_ptr, numel, width, stride, h_stride, BLOCK: tl.constexpr,
                         STRIDED: tl.constexpr, H_STRIDED: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    at = offs  # element offs of (rows, width) operands whose rows lie stride elements apart
    if STRIDED:  # (inlined: a DualKernel cannot call other functions)
        at = offs // width * stride + offs % width
    h_at = offs  # and of h, whose rows lie h_stride apart
    if H_STRIDED:
        h_at = offs // width * h_stride + offs % width
    g = tl.load(g_ptr + at, mask=mask, other=0).to(tl.float32)
    u = tl.load(u_ptr + at, mask=mask, other=0).to(tl.float32)
    act = (g / (1 + tl.exp(-g))).to(h_ptr.dtype.element_ty).to(tl.float32)
    tl.store(h_ptr + h_at, (act * u).to(h_ptr.dtype.element_ty), mask=mask)


def _silu_mul_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, numel, width, stride, BLOCK: tl.constexpr,
                         STRIDED: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    at = offs  # element offs of (rows, width) operands whose rows lie stride elements apart
    if STRIDED:  # (inlined: a DualKernel cannot call other functions)
        at = offs // width * stride + offs % width
    dh = tl.load(dh_ptr + offs, mask=mask, other=0).to(tl.float32)
    g = tl.load(g_ptr + at, mask=mask, other=0).to(tl.float32)
    u = tl.load(u_ptr + at, mask=mask, other=0).to(tl.float32)
    sig = 1 / (1 + tl.exp(-g))  # not tl.sigmoid: a @triton.jit function, which a DualKernel cannot call
    act = g * sig
    tl.store(du_ptr + at, (dh * act.to(g_ptr.dtype.element_ty).to(tl.float32)).to(du_ptr.dtype.element_ty),
             mask=mask)
    tl.store(dg_ptr + at, (dh * u * sig * (1 + g * (1 - sig))).to(dg_ptr.dtype.element_ty), mask=mask)


_FWD = DualKernel(_silu_mul_fwd_kernel)
_BWD = DualKernel(_silu_mul_bwd_kernel)


def silu_mul_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """HF ``LlamaMLP``'s ``act_fn(gate) * up`` with ``act_fn = silu`` (pure torch)."""
    return torch.nn.functional.silu(g) * u


def _check(what: str, rows: dict[str, torch.Tensor], dense: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Validate the operands; returns ``(width, row stride)`` of the ``rows`` operands (contiguous, or
    2-D views with unit column stride sharing one row stride). ``dense`` operands must be contiguous."""
    tensors = {**rows, **dense}
    first = next(iter(tensors.values()))
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dtype not in _DTYPES:
            raise TypeError(f"{what}: {name} must be a fp16/bf16/fp32 tensor")
        if t.shape != first.shape or t.dtype != first.dtype:
            raise ValueError(f"{what}: all operands need one shape and dtype; {name} is {tuple(t.shape)} "
                             f"{t.dtype}, expected {tuple(first.shape)} {first.dtype}")
    check_same_device(what, first, **tensors)
    width = first.shape[-1] if first.dim() else 1
    strides = {t.stride() for t in rows.values()}
    if all(t.is_contiguous() for t in rows.values()):
        stride = width
    elif len(strides) == 1 and first.dim() == 2 and first.stride(1) == 1:
        stride = first.stride(0)
    else:
        raise ValueError(f"{what}: {', '.join(rows)} must be contiguous, or 2-D row views with one row stride "
                         "(call .contiguous() first)")
    for name, t in dense.items():
        if not t.is_contiguous():
            raise ValueError(f"{what}: {name} must be contiguous (call .contiguous() first)")
    return width, stride


def _grid(numel: int) -> tuple[int]:
    return (cdiv(numel, CONFIG["BLOCK"]),)


def silu_mul_forward(g: torch.Tensor, u: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(g) · u`` elementwise (same shape and dtype), as :func:`silu_mul_reference`, into a new
    contiguous tensor, or into ``out``: contiguous, or a ``(T, W)`` row view at its own row stride
    (e.g. the leading columns of a wider buffer). ``g`` and ``u``: contiguous, or ``(T, W)`` row
    views sharing one row stride."""
    width, stride = _check("silu_mul_forward", {"g": g, "u": u}, {})
    if out is None:
        h = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    else:
        if not isinstance(out, torch.Tensor) or out.shape != g.shape or out.dtype != g.dtype:
            got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"silu_mul_forward: out must have g's shape {tuple(g.shape)} and dtype {g.dtype}, got {got}")
        check_same_device("silu_mul_forward", g, out=out)
        if not (out.is_contiguous() or (out.dim() == 2 and out.stride(1) == 1)):
            raise ValueError("silu_mul_forward: out must be contiguous, or a 2-D row view with column stride 1")
        h = out
    h_stride = width if h.is_contiguous() else h.stride(0)
    if g.numel():
        _FWD.launch(g.device, _grid(g.numel()), g, u, h, g.numel(), width, stride, h_stride, STRIDED=stride != width,
                    H_STRIDED=h_stride != width, **CONFIG)
    return h


def silu_mul_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
                      out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dg, du)`` of :func:`silu_mul_forward` for the contiguous output gradient ``dh``; written into
    ``out`` when given (views with ``g``'s and ``u``'s strides, e.g. the halves of one buffer)."""
    dg, du = out if out is not None else (torch.empty_like(g), torch.empty_like(u))
    width, stride = _check("silu_mul_backward", {"g": g, "u": u, "dg": dg, "du": du}, {"dh": dh})
    if g.numel():
        _BWD.launch(g.device, _grid(g.numel()), dh, g, u, dg, du, g.numel(), width, stride, STRIDED=stride != width,
                    **CONFIG)
    return dg, du
