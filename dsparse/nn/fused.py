"""Fused replacements for the elementwise parts of a LLaMA block: RMSNorm, SwiGLU's gate and RoPE.

Sparsity shrinks only the GEMMs, so every millisecond of unfused elementwise work caps the
speedup of a training step (``bench/results/engine_h100_profile.json``: on a llama-1b
step HF's RMSNorm, SwiGLU and the like are a third of the GPU time, dense or sparse).
:func:`fuse_model` swaps HF's ``LlamaRMSNorm`` and ``LlamaMLP`` (and the identical
Mistral/Qwen2 classes) for modules running :mod:`kernels.norm` and :mod:`kernels.swiglu`, and
points each ``LlamaAttention``'s forward at :mod:`kernels.rope` for its rotary embedding.
The swap keeps every parameter object and every state-dict key, so it works before or after
:func:`dsparse.sparsify`, and checkpoints load either way. Dense and sparse models fuse alike.

Below ``min_rows`` rows (default :data:`MIN_FUSED_ROWS`; decoding a few tokens at a time) each
module runs HF's torch code instead: there a Triton launch costs more host time than the GPU
work it saves (llama-1b, batch 8 on an H100: sparse decode went from 0.52x to 0.75x of dense
with this fallback, ``bench/results/infer_h100_fused*.json``). A step replayed from a CUDA graph
pays no launch cost, so :func:`fused_from` lowers every module's threshold for the steps it
captures (:class:`dsparse.decode.GraphDecoder`).
"""
from __future__ import annotations

import logging
import threading
import types
from collections.abc import Callable

import torch
import torch.nn as nn

from ..backends.base import padded_tokens
from ..config import FusionConfig
from .sparse_product import SparseProduct

logger = logging.getLogger(__name__)

# HF classes whose forward is exactly LlamaRMSNorm's / LlamaMLP's (weight · round(x·rstd); down(silu(gate) · up))
RMS_NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")
GATED_MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP")
# HF attention classes whose forward calls their module's rotate-half ``apply_rotary_pos_emb(q, k, cos, sin)``
ROTARY_ATTENTION_CLASSES = ("LlamaAttention", "MistralAttention", "Qwen2Attention")
MIN_FUSED_ROWS = FusionConfig.min_rows  # fewer rows run HF's torch code (decoding), see FusionConfig
# HF decoder layers' norms and the first module reading each one's output (q/k/v and gate/up read it alike)
NORM_READERS = {"input_layernorm": "self_attn.q_proj", "post_attention_layernorm": "mlp.gate_proj"}
_threshold = threading.local()  # .rows: fused_from's override of every module's min_rows, on this thread


class fused_from:  # noqa: N801 (a context manager, named like torch.no_grad)
    """Within the block (on this thread), every fused module runs its kernels from ``rows`` rows on,
    whatever its own ``min_rows``: for steps captured into a CUDA graph, whose replays issue no
    launches from the host, so the kernels' fewer, larger launches win at any row count."""

    def __init__(self, rows: int) -> None:
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise ValueError(f"fused_from: rows must be an integer >= 0 (fused modules run their kernels from "
                             f"that many rows on), got {rows!r}")
        self.rows = rows
        self._previous: list[int | None] = []

    def __enter__(self) -> None:
        self._previous.append(getattr(_threshold, "rows", None))
        _threshold.rows = self.rows

    def __exit__(self, *exc) -> None:
        _threshold.rows = self._previous.pop()


def _min_rows(own: int) -> int:
    """A module's row threshold: its own ``min_rows`` unless :func:`fused_from` overrides it."""
    rows = getattr(_threshold, "rows", None)
    return own if rows is None else rows


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


class _PackedSiluMulFunction(torch.autograd.Function):
    """``silu(g) · u`` of a fused gate/up output ``[g | u]``: the halves read in place, and their
    gradients written into one buffer, which the fused projection's backward takes as it is. When
    that projection's weight gradient is MVUE on cuSPARSELt, the same pass writes its compressed
    ``S(dYᵀ)`` too (:func:`kernels.mvue_compress_swiglu`), so the gradient is not read back for it."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, product) -> torch.Tensor:
        from kernels import silu_mul_forward

        gu = gate_up.reshape(-1, gate_up.shape[-1])
        width = gu.shape[1] // 2
        ctx.save_for_backward(gu)
        ctx.shape = gate_up.shape
        ctx.product = product if isinstance(product, SparseProduct) else None
        h = silu_mul_forward(gu[:, :width], gu[:, width:])
        return h.view(*gate_up.shape[:-1], width)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        from kernels import mvue_compress_swiglu, silu_mul_backward

        (gu,) = ctx.saved_tensors
        width = gu.shape[1] // 2
        dh2d = dh.reshape(-1, width).contiguous()
        dgu = torch.empty_like(gu)
        product = ctx.product
        key = product.mvue_key_for(dgu) if product is not None and width % 64 == 0 else None
        if key is None:
            silu_mul_backward(dh2d, gu[:, :width], gu[:, width:], out=(dgu[:, :width], dgu[:, width:]))
        else:
            _, packed = mvue_compress_swiglu(dh2d, gu, key, padded_tokens(gu.shape[0]), out=dgu)
            product.hold_dw_operand(dgu, key, packed)
        return dgu.view(ctx.shape), None


class _RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        from kernels import rope_forward

        ctx.save_for_backward(cos, sin)
        return rope_forward(q, cos, sin), rope_forward(k, cos, sin)

    @staticmethod
    def backward(ctx, dq: torch.Tensor | None, dk: torch.Tensor | None):
        from kernels import rope_backward

        cos, sin = ctx.saved_tensors
        grads = [None if g is None else rope_backward(g if g.stride(-1) == 1 else g.contiguous(), cos, sin)
                 for g in (dq, dk)]
        return grads[0], grads[1], None, None


def _rotary_applies(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int,
                    min_rows: int) -> bool:
    """Whether the rope kernels compute HF's ``apply_rotary_pos_emb`` for these operands: (b, heads, seq,
    head_dim) queries/keys, (b or 1, seq, head_dim) tables of their dtype, at least ``min_rows`` positions."""
    b, _, s, d = q.shape if q.dim() == 4 else (0, 0, 0, 0)
    return (unsqueeze_dim == 1 and k.dim() == 4 and b * s >= max(min_rows, 1) and d % 2 == 0
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and q.dtype == k.dtype == cos.dtype == sin.dtype
            and (k.shape[0], k.shape[2], k.shape[3]) == (b, s, d) and cos.shape == sin.shape
            and cos.dim() == 3 and cos.shape[0] in (1, b) and tuple(cos.shape[1:]) == (s, d)
            and not (cos.requires_grad or sin.requires_grad) and all(t.stride(-1) == 1 for t in (q, k, cos, sin)))


def _fused_rotary(hf_apply: Callable, min_rows: int) -> Callable:
    """HF's ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``: the rope kernels where they
    apply (the results are bit-identical), ``hf_apply`` itself otherwise."""

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        hf_signature = len(args) + len(kwargs) <= 1 and set(kwargs) <= {"unsqueeze_dim"}
        unsqueeze_dim = args[0] if args else kwargs.get("unsqueeze_dim", 1)
        if hf_signature and _rotary_applies(q, k, cos, sin, unsqueeze_dim, _min_rows(min_rows)):
            return _RotaryFunction.apply(q, k, cos, sin)
        return hf_apply(q, k, cos, sin, *args, **kwargs)

    return apply_rotary_pos_emb


def _fuse_rotary(attn: nn.Module, min_rows: int) -> bool:
    """Run ``attn``'s own forward code with its module's ``apply_rotary_pos_emb`` replaced by the fused
    one, for this instance only: HF's forward calls that module-level function by name, and a copy
    of the function with other globals changes nothing else (other models, other instances). An
    instance that already has its own forward (e.g. accelerate's hooks) is left alone."""
    forward = type(attn).forward
    hf_apply = forward.__globals__.get("apply_rotary_pos_emb")
    if "forward" in vars(attn) or hf_apply is None or "apply_rotary_pos_emb" not in forward.__code__.co_names:
        return False
    scope = {**forward.__globals__, "apply_rotary_pos_emb": _fused_rotary(hf_apply, min_rows)}
    fused = types.FunctionType(forward.__code__, scope, forward.__name__, forward.__defaults__, forward.__closure__)
    fused.__kwdefaults__ = forward.__kwdefaults__
    fused.fused_rope = True  # what fused_counts looks for
    attn.forward = types.MethodType(fused, attn)
    return True


class FusedRMSNorm(nn.Module):
    """HF ``LlamaRMSNorm`` (``weight · round(x·rstd)``, fp32 statistics) in one kernel each way.

    Without autograd, when the module reading its output (:meth:`feed`) folds adapters into its
    operand, the norm writes straight into that module's wide input (:func:`.adapter_fold.input_slot`).
    """

    def __init__(self, weight: nn.Parameter, eps: float, min_rows: int = MIN_FUSED_ROWS) -> None:
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps
        self.min_rows = min_rows

    def feed(self, parent: nn.Module, path: str) -> None:
        """Name the module that reads this norm's output: ``parent.get_submodule(path)``, looked up at each
        forward (sparsify may replace it). Kept outside the module tree (no parameters, not in state_dict)."""
        self.__dict__["_reader"] = (parent, path)

    def _slot(self, x: torch.Tensor) -> torch.Tensor | None:
        """The reader's wide-input slot for this output, or None (no reader, or it does not fold)."""
        from .adapter_fold import input_slot

        reader = self.__dict__.get("_reader")
        if reader is None:
            return None
        try:
            module = reader[0].get_submodule(reader[1])
        except AttributeError:  # the reader was removed
            return None
        dtype = torch.promote_types(x.dtype, self.weight.dtype)
        return input_slot(module, x.numel() // x.shape[-1], dtype, x.device)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.numel() < _min_rows(self.min_rows) * hidden_states.shape[-1]:
            from kernels import rms_norm_reference

            return rms_norm_reference(hidden_states, self.weight, self.variance_epsilon)
        slot = None if torch.is_grad_enabled() else self._slot(hidden_states)
        if slot is not None:
            from kernels import rms_norm_forward

            x2d = hidden_states.reshape(slot.shape)
            rms_norm_forward(x2d if x2d.stride(-1) == 1 else x2d.contiguous(), self.weight, self.variance_epsilon,
                             out=slot)
            return slot.view(*hidden_states.shape[:-1], slot.shape[-1])
        return _RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, fused from {self.min_rows} rows"


class FusedGatedMLP(nn.Module):
    """HF ``LlamaMLP`` with ``silu``: ``down(silu(gate(x)) · up(x))``, the gate fused; same submodules.
    When ``gate_proj`` and ``up_proj`` run as one projection group, the gate reads its output in place;
    without autograd (inference), their adapters add on inside the gate's pass (:func:`kernels.lowrank_silu_mul`)."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module,
                 min_rows: int = MIN_FUSED_ROWS, mvue: bool = True) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.min_rows = min_rows
        self.mvue = mvue  # the backward writes gate/up's MVUE operand (FusionConfig.swiglu_mvue)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .projections import group_of

        group = group_of([self.gate_proj, self.up_proj])  # one gate/up product: its halves in place
        min_rows = _min_rows(self.min_rows)
        if group is not None and group.fused_is_whole and x.numel() >= min_rows * x.shape[-1]:
            if not torch.is_grad_enabled():
                return self.down_proj(self._gate_inference(group, x))
            return self.down_proj(_PackedSiluMulFunction.apply(group.fused(x), group if self.mvue else None))
        gate, up = self.gate_proj(x), self.up_proj(x)
        if gate.numel() < min_rows * gate.shape[-1]:
            from kernels import silu_mul_reference

            return self.down_proj(silu_mul_reference(gate, up))
        return self.down_proj(_SiluMulFunction.apply(gate, up))

    def _gate_inference(self, group, x: torch.Tensor) -> torch.Tensor:
        """``silu(g) · u`` of the gate/up group's output without autograd, written into ``down_proj``'s wide
        input when that folds adapters. Adapters added on after the product (not folded) add on in the
        gate's own pass (:func:`kernels.lowrank_silu_mul`): ``[g | u]`` with adapters is never written."""
        from kernels import lowrank_silu_mul, silu_mul_forward

        from .adapter_fold import input_slot

        rows = x.numel() // x.shape[-1]
        out = input_slot(self.down_proj, rows, x.dtype, x.device)
        if group.adds_adapters and not group.folds_adapters:
            a, b, scale = group.adapter_operands()
            y = group.product(x).reshape(rows, -1)
            h = lowrank_silu_mul(y, torch.nn.functional.linear(x, a).reshape(rows, -1), b, scale, out=out)
        else:
            gu = group.fused(x).reshape(rows, -1)
            width = gu.shape[1] // 2
            h = silu_mul_forward(gu[:, :width], gu[:, width:], out=out)
        return h.view(*x.shape[:-1], h.shape[-1])


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def fuse_model(model: nn.Module, rms_norm: bool = True, swiglu: bool = True, rope: bool = True,
               min_rows: int = MIN_FUSED_ROWS, swiglu_mvue: bool = True) -> dict[str, int]:
    """Fuse ``model``'s HF RMSNorms, SiLU-gated MLPs and rotary embeddings, in place.

    RMSNorms and MLPs are swapped for :class:`FusedRMSNorm` / :class:`FusedGatedMLP`; attention
    modules keep their class and gain an instance forward that applies the rotary embedding
    with :mod:`kernels.rope`. A decoder layer's two norms learn which projection reads them
    (:data:`NORM_READERS`), to write into its wide input when it folds adapters (inference).
    Inputs of fewer than ``min_rows`` rows run HF's torch code; ``swiglu_mvue``: see
    :class:`dsparse.FusionConfig`. Returns
    how many of each were fused. Other classes (e.g. Gemma's
    ``(1 + w)`` norm, GELU-gated MLPs) are left alone: only classes known to compute exactly
    what the fused kernels compute are touched.
    """
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    counts = {"rms_norm": 0, "swiglu": 0, "rope": 0}
    for parent in model.modules():
        if rope and type(parent).__name__ in ROTARY_ATTENTION_CLASSES and _fuse_rotary(parent, min_rows):
            counts["rope"] += 1
        for name, child in parent.named_children():
            kind = type(child).__name__
            if rms_norm and kind in RMS_NORM_CLASSES:
                norm = FusedRMSNorm(child.weight, child.variance_epsilon, min_rows)
                if name in NORM_READERS:
                    norm.feed(parent, NORM_READERS[name])
                swaps.append((parent, name, norm))
                counts["rms_norm"] += 1
            elif swiglu and kind in GATED_MLP_CLASSES and _is_silu(child.act_fn):
                swaps.append((parent, name, FusedGatedMLP(child.gate_proj, child.up_proj, child.down_proj, min_rows,
                                                          swiglu_mvue)))
                counts["swiglu"] += 1
    for parent, name, module in swaps:
        setattr(parent, name, module)
    logger.info("dsparse: fused %d RMSNorms, %d SwiGLU gates and %d rotary embeddings",
                counts["rms_norm"], counts["swiglu"], counts["rope"])
    return counts


def fused_counts(model: nn.Module) -> dict[str, int]:
    """How many RMSNorms, SwiGLU gates and rotary embeddings of ``model`` run fused (as :func:`fuse_model` counts),
    and how many groups of sibling projections (:func:`dsparse.nn.fuse_projections`)."""
    from .projections import projection_groups

    modules = list(model.modules())
    return {"rms_norm": sum(isinstance(m, FusedRMSNorm) for m in modules),
            "swiglu": sum(isinstance(m, FusedGatedMLP) for m in modules),
            "rope": sum(getattr(vars(m).get("forward"), "fused_rope", False) for m in modules),
            "projections": len(projection_groups(model))}
