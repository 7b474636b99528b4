"""Fused replacements for the elementwise parts of a LLaMA block: RMSNorm and SwiGLU's gate.

Sparsity shrinks only the GEMMs, so every millisecond of unfused elementwise work caps the
speedup of a training step (``bench/results/engine_h100_profile.json``: on a llama-1b
step HF's RMSNorm, SwiGLU and the like are a third of the GPU time, dense or sparse).
:func:`fuse_model` swaps HF's ``LlamaRMSNorm`` and ``LlamaMLP`` (and the identical
Mistral/Qwen2 classes) for modules running :mod:`kernels.norm` and :mod:`kernels.swiglu`.
The swap keeps every parameter object and every state-dict key, so it works before or after
:func:`dsparse.sparsify`, and checkpoints load either way. Dense and sparse models fuse alike.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

# HF classes whose forward is exactly LlamaRMSNorm's / LlamaMLP's (weight · round(x·rstd); down(silu(gate) · up))
RMS_NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")
GATED_MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP")


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        from kernels import rms_norm_forward

        x2d = x.reshape(-1, x.shape[-1])
        if x2d.stride(-1) != 1:  # the kernel reads rows as contiguous runs
            x2d = x2d.contiguous()
        y, rstd = rms_norm_forward(x2d, weight, eps)
        ctx.save_for_backward(x2d, weight, rstd)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from kernels import rms_norm_backward

        x2d, weight, rstd = ctx.saved_tensors
        dx, dweight = rms_norm_backward(dy.reshape(x2d.shape), x2d, weight, rstd)
        return dx.view(dy.shape), dweight, None


class _SiluMulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        from kernels import silu_mul_forward

        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return silu_mul_forward(gate, up)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        from kernels import silu_mul_backward

        gate, up = ctx.saved_tensors
        return silu_mul_backward(dh.contiguous(), gate, up)


class FusedRMSNorm(nn.Module):
    """HF ``LlamaRMSNorm`` (``weight · round(x·rstd)``, fp32 statistics) in one kernel each way."""

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, fused"


class FusedGatedMLP(nn.Module):
    """HF ``LlamaMLP`` with ``silu``: ``down(silu(gate(x)) · up(x))``, the gate fused; same submodules."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_SiluMulFunction.apply(self.gate_proj(x), self.up_proj(x)))


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def fuse_model(model: nn.Module, rms_norm: bool = True, swiglu: bool = True) -> dict[str, int]:
    """Swap ``model``'s HF RMSNorms and SiLU-gated MLPs for the fused modules, in place.

    Returns how many of each were swapped. Other classes (e.g. Gemma's ``(1 + w)`` norm,
    GELU-gated MLPs) are left alone: only classes known to compute exactly what the fused
    kernels compute are touched. Training steps and prefill gain; decoding a few tokens at a
    time does not, as a Triton launch costs more host time than HF's small torch kernels
    (llama-1b, batch 8 on an H100: 282 → 324 ms for 16 new tokens, ``bench/results/infer_h100*.json``).
    """
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    counts = {"rms_norm": 0, "swiglu": 0}
    for parent in model.modules():
        for name, child in parent.named_children():
            kind = type(child).__name__
            if rms_norm and kind in RMS_NORM_CLASSES:
                swaps.append((parent, name, FusedRMSNorm(child.weight, child.variance_epsilon)))
                counts["rms_norm"] += 1
            elif swiglu and kind in GATED_MLP_CLASSES and _is_silu(child.act_fn):
                swaps.append((parent, name, FusedGatedMLP(child.gate_proj, child.up_proj, child.down_proj)))
                counts["swiglu"] += 1
    for parent, name, module in swaps:
        setattr(parent, name, module)
    logger.info("dsparse: fused %d RMSNorms and %d SwiGLU gates", counts["rms_norm"], counts["swiglu"])
    return counts
