"""The adapter's multiply-add onto the sparse output, ``y + scale · (u Bᵀ)``, with its gradients.

On CUDA the forward is one fused Triton pass (:func:`kernels.lowrank_addmm`, fp32
accumulation, result in ``y``'s dtype); elsewhere the same sum runs in torch.
"""
from __future__ import annotations

import torch


class _LowRankAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, u: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(u, b)
        ctx.scale = scale
        if y.is_cuda:
            from kernels import lowrank_addmm

            shape = y.shape
            return lowrank_addmm(y.reshape(-1, shape[-1]), u.reshape(-1, u.shape[-1]), b, scale).view(shape)
        return (y.float() + scale * (u.float() @ b.float().t())).to(y.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        u, b = ctx.saved_tensors
        scale = ctx.scale
        du = (dy @ b) * scale if ctx.needs_input_grad[1] else None
        db = None
        if ctx.needs_input_grad[2]:
            db = (dy.reshape(-1, dy.shape[-1]).t() @ u.reshape(-1, u.shape[-1])) * scale
        return dy, du, db, None


def lowrank_add(y: torch.Tensor, u: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``y + scale * (u @ b.t())`` for ``y (.., out)``, ``u (.., r)``, ``b (out, r)``."""
    return _LowRankAdd.apply(y, u, b, scale)
