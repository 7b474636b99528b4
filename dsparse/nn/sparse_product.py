"""The sparse product ``Y = X Wᵀ`` of an N:M weight: its autograd function and its cached GEMM operands.

A :class:`SparseProduct` owns what one such product needs: a backend and the operands
derived from the kept values (compressed ``W``, double-pruned ``W̃ᵀ``), rebuilt when a mask
changes and refreshed when the values change. :class:`~dsparse.nn.SparseLinear` is one
over its own weight; a :class:`~dsparse.nn.projections.ProjectionGroup` is one over the
weights of sibling layers stacked along ``out`` (q/k/v, gate/up), so that they run as one
GEMM each way while every parameter stays its layer's own.
"""
from __future__ import annotations

from typing import Any

import torch

from ..backends import Backend
from ..backends.plans import mvue_pays
from . import adapter_fold


class SparseProduct:
    """Cached operands of an N:M product; subclasses say where the weights and masks come from."""

    n: int
    m: int
    in_features: int
    mvue_dw: bool  # the weight gradient from an MVUE sparsification of dYᵀ (where its plan does not fall back)
    cache_operands: bool
    _cache: tuple[tuple, tuple, Backend, Any] | None = None  # (mask key, value key, backend, operands)
    _inference: tuple[Backend, Any] | None = None  # frozen forward-only operands (prepare_inference)
    _dw_operand: tuple[torch.Tensor, int, torch.Tensor] | None = None  # (dY, MVUE key, S(dYᵀ) compressed)
    _fold: adapter_fold.AdapterFold | None = None  # frozen with the adapters in the forward operand

    # ------------------------------------------------------------- what a subclass provides
    def _sources(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kept values ``(out, in·N/M)`` (detached), their positions ``idx`` and ``W̃ᵀ``'s ``keep_t``."""
        raise NotImplementedError

    def _mask_key(self) -> tuple:
        """Changes whenever a mask (``idx``, ``keep_t``), the dtype or the device changes."""
        raise NotImplementedError

    def _value_key(self) -> tuple:
        """Changes whenever the values may have changed."""
        raise NotImplementedError

    def _value_addresses(self) -> tuple[int, ...]:
        """Where the values are read from (part of the key of a captured in-place refresh)."""
        raise NotImplementedError

    def _resolve_backend(self) -> Backend:
        raise NotImplementedError

    def _positions(self) -> torch.Tensor:
        """The kept values' positions ``idx`` ``(out, in·N/M)``, as :meth:`_sources` gives them."""
        raise NotImplementedError

    def _params(self) -> tuple[torch.Tensor, ...]:
        """The parameters the weight's values live in (what :func:`sparse_product` differentiates)."""
        raise NotImplementedError

    def _param_grads(self, dvalues: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The gradients of the weight parameters given to :func:`sparse_product`, from ``dvalues``."""
        raise NotImplementedError

    def _draw_key(self) -> int:
        """Draw the MVUE key of this micro-batch's weight gradient (one per micro-batch: see :meth:`_weight_grad_key`)."""
        raise NotImplementedError

    def _adapter_rows(self) -> list[tuple[Any, int]]:
        """For each block of output rows, top to bottom: the layer whose active adapter adds onto it (or
        None) and the block's height."""
        raise NotImplementedError

    @property
    def _dx_mode(self) -> str:
        raise NotImplementedError

    @property
    def refreshes_operands(self) -> bool:
        """Whether operands are kept that follow the values (sparse training, cached)."""
        raise NotImplementedError

    @property
    def operands_on_cuda(self) -> bool:
        raise NotImplementedError

    def _freeze(self, inference: tuple[Backend, Any]) -> None:
        """Make ``inference`` (backend, forward-only operands) what every forward runs on."""
        raise NotImplementedError

    def _release_state(self) -> None:
        """Free the kept values and masks (the forward-only operands hold all the forward needs)."""
        raise NotImplementedError

    def _values_read_in_place(self) -> bool:
        """Whether the refresh reads the values where they are stored (so a CUDA graph can replay it)."""
        return True

    # ------------------------------------------------------------- the cache
    def _operands(self) -> tuple[Backend, Any]:
        """The backend and its derived operands for the current values, rebuilt only when stale.

        A change of the masks rebuilds the operands; a change of the values alone (an
        optimizer step) refreshes them, which a backend may do in place.
        """
        if self._inference is not None:
            return self._inference
        cache = self._cache
        mask_key = self._mask_key()
        if cache is not None and cache[0] == mask_key:
            if cache[1] != self._value_key():
                self.refresh_cached_operands()
            return self._cache[2], self._cache[3]
        with torch.no_grad():
            backend = self._resolve_backend()
            values, idx, keep_t = self._sources()
            ops = backend.prepare(values, idx, keep_t, self.n, self.m, dx=self._dx_mode)
        self._cache = (mask_key, self._value_key(), backend, ops) if self.cache_operands else None
        return backend, ops

    @torch.no_grad()
    def refresh_cached_operands(self) -> None:
        """Rewrite the cached operands from the current values (masks unchanged) and mark them current."""
        mask_key, _, backend, ops = self._cache
        values, idx, keep_t = self._sources()
        ops = backend.refresh(ops, values, idx, keep_t, self.n, self.m, dx=self._dx_mode)
        self._cache = (mask_key, self._value_key(), backend, ops)

    def mark_operands_current(self) -> None:
        """Record that the cached operands match the current values (refreshed, e.g. by a graph replay)."""
        mask_key, _, backend, ops = self._cache
        self._cache = (mask_key, self._value_key(), backend, ops)

    def refresh_operands(self) -> None:
        """Bring the cached operands up to date now instead of in the next forward."""
        if self.refreshes_operands:
            self._operands()

    def in_place_refresh_key(self) -> tuple | None:
        """The addresses an in-place refresh of the cached operands reads and writes, or None when the
        next refresh is not in place (no cache yet, a mask changed, values gathered anew, or a
        backend that reallocates)."""
        cache = self._cache
        if (cache is None or not self._values_read_in_place() or cache[0] != self._mask_key()
                or not cache[2].refreshes_in_place(cache[3])):
            return None
        return (cache[0], self._value_addresses(), cache[2].operand_addresses(cache[3]))

    # ------------------------------------------------------------- the weight gradient's operand
    def mvue_key_for(self, dy2d: torch.Tensor) -> int | None:
        """The MVUE draw key of the weight gradient for ``dy2d``, drawn now, when that gradient
        will take ``S(dYᵀ)`` compressed by :func:`kernels.mvue_compress`: then the kernel computing
        ``dy2d`` may write it as well and hand it over (:meth:`hold_dw_operand`). None otherwise
        (no key is drawn)."""
        cache = self._cache
        if (cache is None or self._inference is not None or not any(p.requires_grad for p in self._params())
                or not cache[2].compresses_mvue(dy2d) or not self.mvue_dw or not self._runs_mvue(dy2d)):
            return None  # (no key drawn: the backward draws this micro-batch's)
        return self._draw_key()

    def _weight_grad_key(self, dy2d: torch.Tensor) -> int | None:
        """The MVUE draw key of the weight gradient of ``dy2d``, or None for the exact gradient: where the
        layer takes it (not :attr:`mvue_dw`), and where this shape's MVUE plan measured the exact one
        faster (:meth:`_runs_mvue`). A layer with :attr:`mvue_dw` draws one key per micro-batch either way
        (left unused where the plan falls back), so later draws do not depend on the plans."""
        if not self.mvue_dw:
            return None
        key = self._draw_key()
        return key if self._runs_mvue(dy2d) else None

    def _runs_mvue(self, dy2d: torch.Tensor) -> bool:
        """Whether this shape's MVUE plan runs the MVUE gradient (:func:`~dsparse.backends.plans.mvue_pays`)."""
        return mvue_pays(dy2d.shape[0], dy2d.shape[1], self.in_features, dy2d.dtype)

    def hold_dw_operand(self, dy2d: torch.Tensor, key: int, packed: torch.Tensor) -> None:
        """Keep ``packed`` (``S(dYᵀ)`` of ``dy2d``, drawn with ``key`` from :meth:`mvue_key_for`) for the
        weight gradient of the backward that receives ``dy2d``."""
        self._dw_operand = (dy2d, key, packed)

    def _take_dw_operand(self, dy2d: torch.Tensor) -> tuple[int, torch.Tensor | None] | None:
        """The held key and operand; the key alone if they were made from another tensor than ``dy2d``."""
        held = self._dw_operand
        if held is None:
            return None
        self._dw_operand = None
        dy, key, packed = held
        same = dy.data_ptr() == dy2d.data_ptr() and dy.shape == dy2d.shape and dy.stride() == dy2d.stride()
        return key, packed if same else None

    @torch.no_grad()
    def prepare_inference(self, release_state: bool = True, fold_adapters: bool = True) -> None:
        """Freeze for inference: the forward operand built once, no input-gradient operand; with
        ``release_state`` the kept values and masks freed too (no more training or state_dict).

        ``fold_adapters``: active adapters join the forward operand (:mod:`.adapter_fold`: one GEMM, no
        pass over the output for them), and with ``release_state`` their ``A`` and ``B`` are freed too.
        """
        if self._inference is not None:
            return
        backend = self._resolve_backend()
        values, idx, keep_t = self._sources()
        layers, sizes = zip(*self._adapter_rows())
        folded = fold_adapters and adapter_fold.foldable(self.n, self.m) and any(layers)
        fold = None
        if folded:
            values, idx, keep_t, fold = adapter_fold.fold(values, idx, keep_t, list(layers), list(sizes),
                                                          self.n, self.m)
        ops = backend.prepare(values, idx, keep_t, self.n, self.m, dx="none")
        self._freeze((backend, ops))
        self._fold = fold
        if release_state:
            backend.release_sources(ops)
            self._release_state()
            if folded:
                for layer in filter(None, layers):
                    layer.release_adapter()

    def _frozen_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x Wᵀ + bias`` (plus the folded adapters: one GEMM over the wide input) on the frozen operand,
        outside autograd: a frozen product has no gradients, and an autograd Function's bookkeeping is a
        good part of a decoding step's host time per product."""
        if torch.is_grad_enabled():
            with torch.no_grad():
                y = self._frozen_forward(x, bias)
            return _InferenceOnly.apply(y, x) if x.requires_grad else y
        backend, ops = self._inference
        x2d = x.reshape(-1, x.shape[-1])
        if self._fold is not None:
            x2d = self._fold.wide_input(x2d)
        y = backend.linear(ops, x2d, bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])


class _InferenceOnly(torch.autograd.Function):
    """Marks a frozen product's output where its input requires gradients: a backward through it fails."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        raise RuntimeError("this sparse product was prepared for inference only (prepare_inference / "
                           "load_for_inference): it has no gradients")


class _SparseProductFunction(torch.autograd.Function):
    """Forward with ``M⊙W``, input gradient with the double-pruned ``W̃``, weight gradient at kept entries."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, product: SparseProduct, *params: torch.Tensor):
        backend, ops = product._operands()
        x2d = x.reshape(-1, x.shape[-1])
        y = backend.linear(ops, x2d, bias)
        ctx.product = product
        ctx.backend = backend
        # the backward's operands are the forward's (no step comes between); uncached ones (ZeRO-3) are
        # rebuilt there rather than held through the forward
        ctx.ops = ops if product.cache_operands else None
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, *params)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x = ctx.saved_tensors[0]
        product: SparseProduct = ctx.product
        dy2d = dy.reshape(-1, dy.shape[-1])
        x2d = x.reshape(-1, x.shape[-1])
        dx = dbias = None
        dparams: tuple[torch.Tensor | None, ...] = (None,) * (len(ctx.needs_input_grad) - 3)
        if ctx.needs_input_grad[0]:
            ops = ctx.ops if ctx.ops is not None else product._operands()[1]
            dx = ctx.backend.grad_input(ops, dy2d).reshape(x.shape)
        held = product._take_dw_operand(dy2d)
        if any(ctx.needs_input_grad[3:]):
            key, packed = held if held is not None else (product._weight_grad_key(dy2d), None)
            dvalues = ctx.backend.grad_values(dy2d, x2d, product._positions(), product.n, product.m, key,
                                              mvue_packed=packed)
            dparams = product._param_grads(dvalues)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            dbias = dy2d.sum(0)
        return (dx, dbias, None, *dparams)


def sparse_product(x: torch.Tensor, bias: torch.Tensor | None, product: SparseProduct,
                   params: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``x @ Wᵀ + bias`` for ``product``'s weight, differentiable in ``x``, ``bias`` and ``params``
    (the parameters the weight's values live in, which get the kept-entry gradients); a product frozen
    for inference runs without autograd."""
    if product._inference is not None:
        return product._frozen_forward(x, bias)
    return _SparseProductFunction.apply(x, bias, product, *params)
