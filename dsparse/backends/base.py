"""The interface every compressed-GEMM backend implements.

A backend turns a layer's kept values into derived GEMM operands once per optimizer step
(``prepare``) and runs the two sparse products of a training step with them: the forward
``Y = X (M⊙W)ᵀ + b`` and the input gradient ``dX = dY W̃`` with the double-pruned
transpose. The weight gradient is a dense product reduced to the kept entries; backends
may replace it with something faster.
"""
from __future__ import annotations

import abc
from typing import Any

import torch

from .. import nm


class Backend(abc.ABC):
    """A way to run the sparse GEMMs of :class:`dsparse.nn.SparseLinear`."""

    name: str = "abstract"

    @abc.abstractmethod
    def unsupported_reason(self, device: torch.device, dtype: torch.dtype, n: int, m: int, out_features: int,
                           in_features: int) -> str | None:
        """Why this backend cannot run a layer of this kind here, or None when it can."""

    @abc.abstractmethod
    def prepare(self, values: torch.Tensor, idx: torch.Tensor, keep_t: torch.Tensor, n: int, m: int, *,
                dx: str = "sparse") -> Any:
        """Derived operands for ``W = M⊙W`` and the input-gradient operand, built from the kept values.

        ``dx``: ``"sparse"`` the double-pruned ``W̃ᵀ``; ``"dense"`` ``(M⊙W)ᵀ`` itself (no double
        pruning: ``keep_t`` is not N:M along ``out``), a dense GEMM; ``"none"`` no input
        gradient at all (inference).
        """

    def refresh(self, ops: Any, values: torch.Tensor, idx: torch.Tensor, keep_t: torch.Tensor, n: int,
                m: int, *, dx: str = "sparse") -> Any:
        """Operands after the values changed but the masks did not (may update ``ops`` in place)."""
        return self.prepare(values, idx, keep_t, n, m, dx=dx)

    def refreshes_in_place(self, ops: Any) -> bool:
        """Whether :meth:`refresh` of ``ops`` only rewrites their memory (no allocation, same objects),
        so that a CUDA graph can replay it."""
        return False

    def operand_addresses(self, ops: Any) -> tuple[int, ...]:
        """The device addresses of ``ops``' tensors (what a captured refresh writes)."""
        raise NotImplementedError(f"backend {self.name} does not refresh in place")

    def release_sources(self, ops: Any) -> Any:
        """Drop every reference ``ops`` holds to the training state (kept values, masks), so that
        state can be freed (inference); products then run from the compressed operands alone."""
        return ops

    @abc.abstractmethod
    def linear(self, ops: Any, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x2d @ Wᵀ + bias`` for ``x2d`` of shape ``(tokens, in)``."""

    @abc.abstractmethod
    def grad_input(self, ops: Any, dy2d: torch.Tensor) -> torch.Tensor:
        """``dy2d @ W̃`` for ``dy2d`` of shape ``(tokens, out)``: the input gradient."""

    def compresses_mvue(self, dy2d: torch.Tensor) -> bool:
        """Whether :meth:`grad_values` with an MVUE key would write ``S(dYᵀ)`` of ``dy2d`` with
        :func:`kernels.mvue_compress`, and so takes it as ``mvue_packed`` from a kernel that
        computes ``dy2d`` (SwiGLU's backward for a gate/up projection: :func:`kernels.mvue_compress_swiglu`)."""
        return False

    def grad_values(self, dy2d: torch.Tensor, x2d: torch.Tensor, idx: torch.Tensor, n: int, m: int,
                    mvue_key: int | None = None, mvue_packed: torch.Tensor | None = None) -> torch.Tensor:
        """The weight gradient at the kept entries only, shape ``(out, in*n/m)``: a dense GEMM
        reduced to the kept entries (one Triton pass on CUDA, reading the uint8 positions).

        ``mvue_key`` (:func:`dsparse.nm.mvue_key`): use the unbiased MVUE 2:4 sparsification of
        ``dYᵀ`` along the tokens (:func:`dsparse.nm.mvue_pairs`, drawn from the key) instead of
        ``dYᵀ`` itself, which backends may run as a sparse GEMM. ``mvue_packed``: that
        sparsification already compressed (``kernels.mvue_compress(dy2d, mvue_key, ..)``, written by
        whoever computed ``dy2d``); only given where :meth:`compresses_mvue` says so.
        """
        if mvue_packed is not None:
            raise ValueError(f"{type(self).__name__} takes no compressed S(dYᵀ) (see compresses_mvue)")
        if mvue_key is not None:
            dyt = mvue_grad_output(dy2d, mvue_key)
            x2d = torch.nn.functional.pad(x2d, (0, 0, 0, dyt.shape[1] - x2d.shape[0]))
            return reduce_to_kept(dyt.mm(x2d), idx, n, m)
        return reduce_to_kept(dy2d.t().mm(x2d), idx, n, m)


MVUE_TOKEN_MULTIPLE = 64  # the tokens are padded with zeros to this (cuSPARSELt's sparse operand is then unpadded)


def padded_tokens(tokens: int) -> int:
    """The token count the MVUE weight gradient runs at (zero rows added; they contribute nothing)."""
    return -(-tokens // MVUE_TOKEN_MULTIPLE) * MVUE_TOKEN_MULTIPLE


def mvue_grad_output(dy2d: torch.Tensor, key: int) -> torch.Tensor:
    """``S(dYᵀ)`` ``(out, padded_tokens(T))``: 2:4 along the tokens, zero tokens appended.

    On CUDA one Triton pass (:func:`kernels.mvue_transpose`, bit-identical to the torch code)."""
    tokens = dy2d.shape[0]
    padded = padded_tokens(tokens)
    if dy2d.is_cuda:
        from kernels import mvue_transpose

        return mvue_transpose(dy2d, key, padded)
    rand = nm.mvue_uniform(key, dy2d.shape[1], padded // 2, dy2d.device)
    return nm.mvue_pairs(torch.nn.functional.pad(dy2d, (0, 0, 0, padded - tokens)).t(), rand)


def reduce_to_kept(dense: torch.Tensor, idx: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """A dense ``(out, in)`` weight gradient's entries at the kept positions ``idx``."""
    if dense.is_cuda:
        from kernels import gather_kept

        return gather_kept(dense, idx, n, m)
    return nm.gather_kept(dense, idx, m)
