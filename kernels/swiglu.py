"""SwiGLU's gate, ``h = silu(g) · u`` (LLaMA's MLP between its up and down projections), forward and
backward in one pass each.

HF's ``LlamaMLP`` runs ``act_fn(gate) * up`` as two kernels forward and four backward over the
``(tokens, intermediate)`` activations. Here the forward reads ``g`` and ``u`` once and writes
``h`` (rounding ``silu(g)`` to the input dtype first, as HF does); the backward recomputes
``silu`` from ``g`` and writes ``dg`` and ``du`` in one pass, all arithmetic in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import DualKernel, check_same_device

__all__ = ["silu_mul_forward", "silu_mul_backward", "silu_mul_reference"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CONFIG = {"BLOCK": 4096, "num_warps": 8}


def _silu_mul_fwd_kernel(g_ptr, u_ptr, h_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0).to(tl.float32)
    act = (g / (1 + tl.exp(-g))).to(h_ptr.dtype.element_ty).to(tl.float32)
    tl.store(h_ptr + offs, (act * u).to(h_ptr.dtype.element_ty), mask=mask)


def _silu_mul_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dh = tl.load(dh_ptr + offs, mask=mask, other=0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0).to(tl.float32)
    sig = 1 / (1 + tl.exp(-g))  # not tl.sigmoid: a @triton.jit function, which a DualKernel cannot call
    act = g * sig
    tl.store(du_ptr + offs, (dh * act.to(g_ptr.dtype.element_ty).to(tl.float32)).to(du_ptr.dtype.element_ty),
             mask=mask)
    tl.store(dg_ptr + offs, (dh * u * sig * (1 + g * (1 - sig))).to(dg_ptr.dtype.element_ty), mask=mask)


_FWD = DualKernel(_silu_mul_fwd_kernel)
_BWD = DualKernel(_silu_mul_bwd_kernel)


def silu_mul_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """HF ``LlamaMLP``'s ``act_fn(gate) * up`` with ``act_fn = silu`` (pure torch)."""
    return torch.nn.functional.silu(g) * u


def _check(what: str, **tensors: torch.Tensor) -> torch.Tensor:
    first = next(iter(tensors.values()))
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dtype not in _DTYPES:
            raise TypeError(f"{what}: {name} must be a fp16/bf16/fp32 tensor")
        if t.shape != first.shape or t.dtype != first.dtype:
            raise ValueError(f"{what}: all operands need one shape and dtype; {name} is {tuple(t.shape)} "
                             f"{t.dtype}, expected {tuple(first.shape)} {first.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{what}: {name} must be contiguous (call .contiguous() first)")
    check_same_device(what, first, **tensors)
    return first


def _grid(numel: int) -> tuple[int]:
    return (triton.cdiv(numel, CONFIG["BLOCK"]),)


def silu_mul_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) · u`` elementwise (contiguous, same shape and dtype), as :func:`silu_mul_reference`."""
    _check("silu_mul_forward", g=g, u=u)
    h = torch.empty_like(g)
    if g.numel():
        _FWD.launch(g.device, _grid(g.numel()), g, u, h, g.numel(), **CONFIG)
    return h


def silu_mul_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dg, du)`` of :func:`silu_mul_forward` for the output gradient ``dh``."""
    _check("silu_mul_backward", dh=dh, g=g, u=u)
    dg, du = torch.empty_like(g), torch.empty_like(u)
    if g.numel():
        _BWD.launch(g.device, _grid(g.numel()), dh, g, u, dg, du, g.numel(), **CONFIG)
    return dg, du
