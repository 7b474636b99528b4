"""Triton kernels for dsparse's 2:4 double-pruned (SLoPe) training.

* :func:`transpose_values` — W̃ᵀ's compressed values from W's kept values in one pass
  (the per-step refresh of the cuSPARSELt operand; ``out=`` writes into its values region).
* :func:`transpose_keep_and_slots` — W̃ᵀ's ``keep_t`` and ``slots_t`` in one pass (at mask
  changes), bit-identical to ``nm.transpose_keep`` + ``cusparselt.transpose_slots``.
* :func:`lowrank_addmm` — ``y + scale * (u @ bᵀ) (+ bias)`` fused, fp32 accumulation.
* :func:`lowrank_silu_mul` — the same onto a fused gate/up output, SwiGLU's gate as its epilogue.
* :func:`bias_add` — ``y + bias`` (the r = 0 path of :func:`lowrank_addmm`).
* :func:`gather_kept` — a dense matrix's entries at N:M positions (the weight gradient's
  reduction to the kept entries); :func:`weight_grad_kept` — ``dYᵀ X`` with that reduction in
  the GEMM's epilogue (no dense temporary).
* :func:`rms_norm_forward` / :func:`rms_norm_backward` — LLaMA's RMSNorm, one pass each way.
* :func:`silu_mul_forward` / :func:`silu_mul_backward` — SwiGLU's ``silu(g)·u``, one pass each way.
* :func:`rope_forward` / :func:`rope_backward` — the rotary embedding of queries or keys, one pass
  each way, bit-identical to HF's.
* :func:`mvue_transpose` — the unbiased 2:4 sparsification of ``dYᵀ`` for MVUE weight
  gradients, transposed and padded in one pass; :func:`mvue_compress` writes it straight
  into cuSPARSELt's compressed layout (:mod:`kernels.cslt_meta`); :func:`mvue_compress_swiglu`
  does so for a gate/up projection inside SwiGLU's backward pass.
* :func:`skinny_sparse_mm` — ``x @ Aᵀ (+ bias)`` for few tokens (decoding) straight from cuSPARSELt's
  compressed ``A``: the weight read at 9/16 of its dense bytes; :func:`skinny_mma_sparse_mm` does it on
  the sparse tensor cores (CUDA C++ in ``csrc/``, built on first use; CUDA only).

Each has a pure-torch ``*_reference`` next to it (:func:`skinny_mma_sparse_mm` shares
:func:`skinny_sparse_mm`'s). The Triton kernels run compiled on CUDA tensors and through the
Triton interpreter on CPU tensors (tests only: slow), whatever ``TRITON_INTERPRET`` said when
this package was imported (see :mod:`kernels._triton`).
None of them builds an autograd graph.
"""
from .gather import gather_kept, gather_kept_reference
from .kept_grad import weight_grad_kept, weight_grad_kept_reference
from .lowrank import bias_add, bias_add_reference, lowrank_addmm, lowrank_addmm_reference, lowrank_silu_mul
from .mvue import (mvue_compress, mvue_compress_reference, mvue_compress_swiglu, mvue_transpose,
                   mvue_transpose_reference)
from .norm import rms_norm_backward, rms_norm_forward, rms_norm_reference
from .swiglu import silu_mul_backward, silu_mul_forward, silu_mul_reference
from .rope import rope_backward, rope_forward, rope_reference
from .masks import transpose_keep_and_slots, transpose_keep_and_slots_reference
from .refresh import transpose_values, transpose_values_reference
from .skinny import skinny_sparse_mm, skinny_sparse_mm_reference
from .skinny_mma import skinny_mma_sparse_mm

__all__ = [
    "gather_kept",
    "gather_kept_reference",
    "weight_grad_kept",
    "weight_grad_kept_reference",
    "transpose_values",
    "transpose_values_reference",
    "transpose_keep_and_slots",
    "transpose_keep_and_slots_reference",
    "lowrank_addmm",
    "lowrank_addmm_reference",
    "lowrank_silu_mul",
    "bias_add",
    "bias_add_reference",
    "mvue_transpose",
    "mvue_transpose_reference",
    "mvue_compress",
    "mvue_compress_reference",
    "mvue_compress_swiglu",
    "rms_norm_forward",
    "rms_norm_backward",
    "rms_norm_reference",
    "silu_mul_forward",
    "silu_mul_backward",
    "silu_mul_reference",
    "rope_forward",
    "rope_backward",
    "rope_reference",
    "skinny_sparse_mm",
    "skinny_sparse_mm_reference",
    "skinny_mma_sparse_mm",
]
