"""Sibling projections that read the same input (q/k/v, gate/up) run as one GEMM each way.

HF's attention calls ``q_proj``, ``k_proj`` and ``v_proj`` one after another on the same
hidden states, and its MLP ``gate_proj`` and ``up_proj``. Run apart, a 1B LLaMA's small
k/v products (2048→256) are launch-bound and lose to dense, and autograd adds their input
gradients with extra full-size passes. :func:`fuse_projections` groups such siblings: the
first sibling's call computes the product with their weights stacked along ``out`` and
hands each sibling its slice; the backward gets one input gradient and one weight gradient
for the stack. Every parameter, buffer and state-dict key stays its layer's own, so
optimizers, ZeRO-1/2, checkpoints and exports see no difference.

* SparseLinear siblings (same pattern, backend, dtype, ...) share one
  :class:`ProjectionGroup`: a :class:`~dsparse.nn.sparse_product.SparseProduct` over the
  stacked kept values, compressed once per mask change and refreshed after each optimizer
  step like a layer's own operands. Active adapters add on as one more pair of products:
  ``x`` times the stacked ``A``s, then one multiply-add with the ``B``s block-diagonal
  (:meth:`ProjectionGroup.adds_adapters`); while some are inactive, each active one adds onto
  its slice.
* ``nn.Linear`` siblings (a dense run, so dense and sparse compare alike) multiply by their
  stacked weights.

Grouping moves the siblings' weights (and masks) back to back into one tensor each
(:func:`colocate`), and DeepSpeed's ZeRO-1/2 flat buffers keep them so, so the stacks are
views, not copies: no extra memory, nothing saved for backward but the parameters themselves
(:func:`stacked_rows`).

A group runs fused while its layers train sparse with cached operands and once frozen for
inference (:meth:`SparseLinear.prepare_inference` builds one forward operand for the group);
not during a dense warm-up, and never under ZeRO-3, whose parameters exist only while their
own module runs. Otherwise each layer runs alone.
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backends import Backend, resolve_backend
from .lowrank import lowrank_add
from .sparse_linear import SparseLinear
from .sparse_product import SparseProduct, sparse_product

logger = logging.getLogger(__name__)

# children of one module that HF models call on the same input
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def colocate(params: list[torch.Tensor]) -> None:
    """Give the parameters one storage, back to back in this order (same values), so that
    :func:`stacked_rows` of them is a view."""
    with torch.no_grad():
        stacked = torch.cat([p.detach() for p in params])
    for p, part in zip(params, stacked.split([p.shape[0] for p in params])):
        p.data = part


def stacked_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)`` along rows: a view when the parts lie back to back in one storage, else a copy."""
    first = parts[0]
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for part in parts:
        if (not part.is_contiguous() or part.untyped_storage().data_ptr() != storage
                or part.storage_offset() != offset or part.shape[1:] != first.shape[1:]):
            return torch.cat(parts)
        offset += part.numel()
    return first.as_strided((sum(part.shape[0] for part in parts), *first.shape[1:]), first.stride(),
                            first.storage_offset())


class _StackedLinearFunction(torch.autograd.Function):
    """``x Wᵀ + b`` for ``W`` the weights stacked along ``out``; saves the weights, not their stack."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, *weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, *weights)
        return F.linear(x, stacked_rows(list(weights)), bias)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, *weights = ctx.saved_tensors
        dy2d, x2d = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        dx = dy.matmul(stacked_rows(weights)) if ctx.needs_input_grad[0] else None
        dbias = dy2d.sum(0) if ctx.needs_input_grad[1] else None
        dweights = (dy2d.t().mm(x2d).split([w.shape[0] for w in weights]) if any(ctx.needs_input_grad[2:])
                    else (None,) * len(weights))
        return (dx, dbias, *dweights)


class _Siblings:
    """Hands each sibling its slice of one fused product of their shared input."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.sizes = [layer.out_features for layer in layers]
        self._pending: tuple[torch.Tensor, int, bool, tuple[torch.Tensor, ...], set[int]] | None = None

    def output(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``layer``'s output for ``x``: a slice of the fused product, computed at the first sibling's call
        for this very input and dropped once every sibling has taken its slice."""
        i = next(j for j, sibling in enumerate(self.layers) if sibling is layer)
        pending = self._pending
        if (pending is None or pending[0] is not x or pending[1] != x._version
                or pending[2] != torch.is_grad_enabled() or i in pending[4]):
            outputs = self.fused(x).split(self.sizes, dim=-1)  # (a folded product writes beside x: version after)
            pending = (x, x._version, torch.is_grad_enabled(), outputs, set())
        pending[4].add(i)
        self._pending = None if len(pending[4]) == len(self.layers) else pending
        return pending[3][i]

    @property
    def runs_fused(self) -> bool:
        """Whether the siblings run as this group's product now (else each layer runs alone)."""
        return True

    @property
    def fused_is_whole(self) -> bool:
        """Whether :meth:`fused` is the layers' whole output, so a caller may read it instead of calling them."""
        return True

    @property
    def adds_adapters(self) -> bool:
        """Whether :meth:`fused` includes the layers' adapters (then :meth:`product` is the output without them,
        unless they are folded into the operand)."""
        return False

    @property
    def folds_adapters(self) -> bool:
        """Whether the adapters are inside the forward operand (:mod:`.adapter_fold`), not added after it."""
        return False

    def _biases(self) -> torch.Tensor | None:
        biases = [layer.bias for layer in self.layers]
        return None if biases[0] is None else torch.cat(biases)

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        """The siblings' outputs for ``x``, side by side along the last dimension (one product)."""
        raise NotImplementedError


class ProjectionGroup(_Siblings, SparseProduct):
    """SparseLinear siblings as one sparse product over their weights stacked along ``out``."""

    def __init__(self, layers: list[SparseLinear]) -> None:
        super().__init__(layers)
        first = layers[0]
        self.n, self.m = first.n, first.m
        self.in_features, self.out_features = first.in_features, sum(self.sizes)
        self.cache_operands = True
        self._masks: tuple[tuple, torch.Tensor, torch.Tensor] | None = None  # (mask key, stacked idx, keep_t)
        self._adapters: tuple[torch.Tensor, torch.Tensor, float] | None = None  # frozen: (A stack, B diag, scale)

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        if self._fold is not None:
            return self._frozen_forward(x, self._biases())
        y = self.product(x)
        if self.adds_adapters:
            a, b, scale = self.adapter_operands()
            y = lowrank_add(y, F.linear(x, a), b, scale)
        return y

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """The layers' sparse products (and biases) for ``x``, side by side, without adapters (not for a group
        whose adapters are folded into its operand)."""
        if self._fold is not None:
            raise RuntimeError("this group's adapters are folded into its forward operand: use fused()")
        return sparse_product(x, self._biases(), self, self._params())

    @property
    def adds_adapters(self) -> bool:
        """Whether the group adds its layers' adapters itself: folded into its operand (frozen), or all
        active: then one ``x·Aᵀ`` for all and one multiply-add, instead of a pair of products per layer
        that each read ``x`` again."""
        return self._fold is not None or all(layer.adapter_is_active for layer in self.layers)

    @property
    def folds_adapters(self) -> bool:
        return self._fold is not None

    @property
    def fused_is_whole(self) -> bool:
        return self.adds_adapters or not any(layer.adapter_is_active for layer in self.layers)

    def adapter_operands(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``[A_1; A_2; ..]``, ``diag(B_1, B_2, ..)`` and the scale: built in autograd's graph while
        training, once when frozen for inference. Adapters of different scales (q/k/v's ranks differ)
        have them folded into their ``A`` rows (one bf16 rounding of ``A``) and scale 1."""
        if self._inference is not None and self._adapters is not None:
            return self._adapters
        scales = [layer.adapter_scale for layer in self.layers]
        if len(set(scales)) == 1:
            a, scale = torch.cat([layer.adapter_a for layer in self.layers]), scales[0]
        else:
            a, scale = torch.cat([layer.adapter_a * s for layer, s in zip(self.layers, scales)]), 1.0
        b = torch.block_diag(*(layer.adapter_b for layer in self.layers))
        if self._inference is not None:
            self._adapters = (a.detach(), b.detach(), scale)
        return a, b, scale

    # ------------------------------------------------------------- SparseProduct
    def _stacked_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        key = self._mask_key()
        if self._masks is None or self._masks[0] != key:
            self._masks = (key, stacked_rows([layer.idx for layer in self.layers]),
                           stacked_rows([layer.keep_t for layer in self.layers]))
        return self._masks[1], self._masks[2]

    def _sources(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        values = stacked_rows([layer.kept_values().detach() for layer in self.layers])
        return (values, *self._stacked_masks())

    @property
    def values_stacked_in_place(self) -> bool:
        """Whether the layers' values and masks lie back to back, so their stacks are views (no copies)."""
        parts = [[layer.kept_values() for layer in self.layers], [layer.idx for layer in self.layers],
                 [layer.keep_t for layer in self.layers]]
        return (all(layer.compress for layer in self.layers)
                and all(stacked_rows(tensors).data_ptr() == tensors[0].data_ptr() for tensors in parts))

    def _positions(self) -> torch.Tensor:
        return self._stacked_masks()[0]

    def _mask_key(self) -> tuple:
        return tuple(layer._mask_key() for layer in self.layers)

    def _value_key(self) -> tuple:
        return tuple(layer._value_key() for layer in self.layers)

    def _value_addresses(self) -> tuple[int, ...]:
        return tuple(address for layer in self.layers for address in layer._value_addresses())

    def _values_read_in_place(self) -> bool:
        # stacked values that are a copy are made inside the captured refresh (the graph's own memory)
        return all(layer._values_read_in_place() for layer in self.layers)

    def _resolve_backend(self) -> Backend:
        first = self.layers[0]
        param = first._param
        return resolve_backend(first.backend, param.device, param.dtype, self.n, self.m, self.out_features,
                               self.in_features, layer=f"projections {self.sizes} of {self.in_features} inputs")

    def _params(self) -> tuple[torch.Tensor, ...]:
        return tuple(layer._param for layer in self.layers)

    def _param_grads(self, dvalues: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(layer._param_grad(d) for layer, d in zip(self.layers, dvalues.split(self.sizes)))

    @property
    def mvue_dw(self) -> bool:
        return self.layers[0].mvue_dw

    def _draw_key(self) -> int:
        return self.layers[0]._draw_key()

    def _adapter_rows(self) -> list[tuple[Any, int]]:
        return [(layer if layer.adapter_is_active else None, size) for layer, size in zip(self.layers, self.sizes)]

    @property
    def _dx_mode(self) -> str:
        return self.layers[0]._dx_mode

    @property
    def refreshes_operands(self) -> bool:
        return all(layer.refreshes_operands for layer in self.layers)

    @property
    def runs_fused(self) -> bool:
        return self._inference is not None or self.refreshes_operands

    def _freeze(self, inference: tuple[Backend, Any]) -> None:
        self._inference, self._cache = inference, None
        for layer in self.layers:  # they run only through this group from now on
            layer._freeze(inference)

    def _release_state(self) -> None:
        self._masks = self._adapters = None
        for layer in self.layers:
            layer._release_state()

    @property
    def operands_on_cuda(self) -> bool:
        return self.layers[0].operands_on_cuda


class DenseProjectionGroup(_Siblings):
    """``nn.Linear`` siblings as one GEMM on their concatenated weights."""

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        return _StackedLinearFunction.apply(x, self._biases(), *(layer.weight for layer in self.layers))


def _sparse_compatible(layers: list[nn.Module]) -> bool:
    first = layers[0]
    same = ("in_features", "n", "m", "backend", "compress", "double_prune", "mvue_dw", "cache_operands")
    return (all(type(layer) is SparseLinear and getattr(layer, "projection_group", None) is None for layer in layers)
            and all(getattr(layer, a) == getattr(first, a) for layer in layers for a in same)
            and all((layer.bias is None) == (first.bias is None) for layer in layers)
            and len({(layer._param.dtype, layer._param.device) for layer in layers}) == 1)


def _dense_compatible(layers: list[nn.Module]) -> bool:
    first = layers[0]
    return (all(type(layer) is nn.Linear and "forward" not in vars(layer) for layer in layers)
            and all(layer.in_features == first.in_features and (layer.bias is None) == (first.bias is None)
                    for layer in layers)
            and len({(layer.weight.dtype, layer.weight.device) for layer in layers}) == 1)


def fuse_projections(model: nn.Module, siblings: tuple[tuple[str, ...], ...] = SIBLINGS) -> int:
    """Group ``model``'s sibling projections (children named as in ``siblings``, of one module, reading
    one input), in place; returns how many groups. Run it after :func:`dsparse.sparsify`: SparseLinear
    siblings get a :class:`ProjectionGroup`, ``nn.Linear`` siblings a :class:`DenseProjectionGroup`.
    Siblings of other or mixed kinds, shapes or settings stay apart. ZeRO-3-partitioned layers are refused:
    their parameters exist only while their own module runs."""
    groups = 0
    for parent in model.modules():
        for names in siblings:
            layers = [parent._modules.get(name) for name in names]
            if any(layer is None for layer in layers):
                continue
            if any(hasattr(p, "ds_id") for layer in layers for p in layer.parameters(recurse=False)):
                raise ValueError(f"fuse_projections: {type(parent).__name__}'s {', '.join(names)} are partitioned "
                                 "by ZeRO-3, which gathers a module's parameters only while it runs; group "
                                 "projections under ZeRO-1/2 only (dsparse.initialize skips them under ZeRO-3)")
            if _sparse_compatible(layers):
                group: Any = ProjectionGroup(layers)
                for layer in layers:
                    layer.projection_group = group
                    layer._cache = None  # the group's operands replace the layer's own
                for name in ("values", "idx", "keep_t") if layers[0].compress else ("idx", "keep_t"):
                    colocate([getattr(layer, name) for layer in layers])
            elif _dense_compatible(layers):
                group = DenseProjectionGroup(layers)
                for layer in layers:
                    layer.forward = functools.partial(group.output, layer)
                colocate([layer.weight for layer in layers])
            else:
                logger.info("dsparse: %s of %s stay apart (different kinds or settings)", names, type(parent).__name__)
                continue
            groups += 1
    logger.info("dsparse: %d groups of sibling projections run fused", groups)
    return groups


def group_of(layers: list[nn.Module]) -> _Siblings | None:
    """The group that runs exactly ``layers`` (in this order) as one product now, if any."""
    group = _group(layers[0])
    return group if group is not None and group.layers == layers and group.runs_fused else None


def _group(module: nn.Module) -> _Siblings | None:
    group = getattr(module, "projection_group", None)
    forward = vars(module).get("forward")
    if group is None and isinstance(forward, functools.partial) and isinstance(forward.func.__self__,
                                                                               DenseProjectionGroup):
        group = forward.func.__self__
    return group


def projection_groups(model: nn.Module) -> list[_Siblings]:
    """The distinct projection groups of ``model`` (sparse and dense)."""
    found: dict[int, _Siblings] = {}
    for module in model.modules():
        group = _group(module)
        if group is not None:
            found[id(group)] = group
    return list(found.values())
