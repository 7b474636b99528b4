"""Rotary position embedding (HF's rotate-half form), forward and backward in one pass each.

HF's ``apply_rotary_pos_emb`` computes ``x·cos + rotate_half(x)·sin`` for the queries and keys of
every attention layer: a slice, a negation and a concatenation for ``rotate_half``, two
products and a sum, each its own kernel over the ``(batch, heads, seq, head_dim)`` activations,
and as many again backward. Here one program rotates all heads of one position, reading the
position's ``cos``/``sin`` once. Each product and the sum round to the input dtype where HF's
do (the product of two bf16/fp16 values is exact in fp32, so each rounding is the one torch
makes; fp32 products are not contracted into FMAs): the results equal HF's bit for bit.

For halves ``x = [x1, x2]``, ``cos = [c1, c2]``, ``sin = [s1, s2]``:

* forward: ``[x1·c1 - x2·s1, x2·c2 + x1·s2]``;
* backward (the transpose, for the output gradient ``g``): ``[g1·c1 + g2·s2, g2·c2 - g1·s1]``.
"""
from __future__ import annotations

import torch
import triton.language as tl

from ._triton import DualKernel, cdiv, check_same_device, next_power_of_2

__all__ = ["rope_forward", "rope_backward", "rope_reference"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, S, H, sxb, sxh, sxs, sob, soh, sos, scb, scs,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, H_CHUNKS: tl.constexpr, BLOCK_D: tl.constexpr,
                 BACKWARD: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b, s = pid // S, pid % S
    d = tl.arange(0, BLOCK_D)
    dmask = d < HALF
    cs = cos_ptr + b * scb + s * scs + d
    sn = sin_ptr + b * scb + s * scs + d
    c1 = tl.load(cs, mask=dmask, other=0).to(tl.float32)[None, :]
    c2 = tl.load(cs + HALF, mask=dmask, other=0).to(tl.float32)[None, :]
    s1 = tl.load(sn, mask=dmask, other=0).to(tl.float32)[None, :]
    s2 = tl.load(sn + HALF, mask=dmask, other=0).to(tl.float32)[None, :]
    if BACKWARD:
        sa, sb = s2, -s1
    else:
        sa, sb = -s1, s2
    dt = out_ptr.dtype.element_ty
    h = tl.arange(0, BLOCK_H)[:, None]
    for chunk in range(H_CHUNKS):  # constexpr trip count (runtime bounds trip up the interpreter)
        hh = chunk * BLOCK_H + h
        mask = (hh < H) & dmask[None, :]
        xp = x_ptr + b * sxb + hh * sxh + s * sxs + d[None, :]
        op = out_ptr + b * sob + hh * soh + s * sos + d[None, :]
        x1 = tl.load(xp, mask=mask, other=0).to(tl.float32)
        x2 = tl.load(xp + HALF, mask=mask, other=0).to(tl.float32)
        # each product and the sum rounded to the dtype, as HF's separate kernels do
        o1 = (x1 * c1).to(dt).to(tl.float32) + (x2 * sa).to(dt).to(tl.float32)
        o2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * sb).to(dt).to(tl.float32)
        tl.store(op, o1.to(dt), mask=mask)
        tl.store(op + HALF, o2.to(dt), mask=mask)


_KERNEL = DualKernel(_rope_kernel)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's ``x·cos + rotate_half(x)·sin`` for ``x`` ``(b, h, s, d)`` and ``cos``/``sin`` ``(b or 1, s, d)``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.unsqueeze(1) + torch.cat((-x2, x1), dim=-1) * sin.unsqueeze(1)


def _check(what: str, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _DTYPES:
            raise TypeError(f"{what}: {name} must be a fp16/bf16/fp32 tensor")
        if t.dtype != x.dtype:
            raise ValueError(f"{what}: {name} is {t.dtype}, x is {x.dtype}; cast the tables to x's dtype (as HF does)")
        if t.stride(-1) != 1:
            raise ValueError(f"{what}: {name}'s last dimension must be contiguous (call .contiguous() first)")
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"{what}: x must be (batch, heads, seq, head_dim) with an even head_dim, got {tuple(x.shape)}")
    b, _, s, d = x.shape
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, b) or tuple(t.shape[1:]) != (s, d):
            raise ValueError(f"{what}: {name} must be ({b} or 1, {s}, {d}) for x {tuple(x.shape)}, "
                             f"got {tuple(t.shape)}")
    check_same_device(what, x, cos=cos, sin=sin)


def _rotate(what: str, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    _check(what, x, cos, sin)
    out = torch.empty_like(x)  # x's layout (e.g. the transposed view of a projection's output)
    if out.stride(-1) != 1:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    b, h, s, d = x.shape
    if x.numel():
        if cos.shape != sin.shape or cos.stride() != sin.stride():  # the kernel walks both with cos's strides
            batch = max(cos.shape[0], sin.shape[0])
            cos, sin = (t.expand(batch, s, d).contiguous() for t in (cos, sin))
        cb = cos.stride(0) if cos.shape[0] > 1 else 0
        block_h = min(next_power_of_2(h), 16)
        _KERNEL.launch(x.device, (b * s,), x, cos, sin, out, s, h, *x.stride()[:3], *out.stride()[:3], cb,
                       cos.stride(1), HALF=d // 2, BLOCK_H=block_h, H_CHUNKS=cdiv(h, block_h),
                       BLOCK_D=next_power_of_2(d // 2), BACKWARD=backward, num_warps=4,
                       enable_fp_fusion=False)  # no FMA: fp32 rounds each product as torch does
    return out


def rope_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`rope_reference` in one kernel: ``x`` ``(b, h, s, d)`` with unit last stride (any other
    strides, e.g. ``proj(h).view(b, s, h, d).transpose(1, 2)``); the result has ``x``'s layout."""
    return _rotate("rope_forward", x, cos, sin, backward=False)


def rope_backward(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`rope_forward` with respect to ``x`` for the output gradient ``grad``."""
    return _rotate("rope_backward", grad, cos, sin, backward=True)
