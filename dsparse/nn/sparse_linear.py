"""SparseLinear: a linear layer whose weight is N:M sparse, trained the SLoPe way.

State (the single source of truth; everything else derives from it):

* ``values`` — ``nn.Parameter`` ``(out, in·N/M)``: the kept weights. Optimizers, DeepSpeed's
  ZeRO, clipping and checkpoints see only this half-size tensor. (With ``compress=False``
  the parameter is a dense ``weight`` ``(out, in)`` instead, for debugging; the layer
  computes the same numbers from its kept entries.)
* ``idx`` — uint8 buffer: each kept value's position in its group of M. Static.
* ``keep_t`` — bool buffer over the kept values: which survive the second pruning that
  makes the input-gradient operand ``W̃ᵀ``. Re-chosen every ``mask_change_freq`` steps.
* ``mask_step`` — optimizer steps taken, so the mask schedule survives checkpoints.
* optional low-rank adapter ``adapter_a`` ``(r, in)``, ``adapter_b`` ``(out, r)``:
  ``Y += (X Aᵀ) Bᵀ · alpha / r`` once ``adapter_active``.

The compressed GEMM operands are derived state, refreshed when the values change: after
every optimizer step (:meth:`SparseLinear.on_optimizer_step`, called by the optimizer hook
or the dsparse engine; DeepSpeed writes parameters through ``.data``, which no version
counter sees), after :meth:`mark_values_changed`, and whenever the parameter's storage or
version counter moves (``load_state_dict``, ``.to()``, in-place edits). Micro-batches
between steps reuse them. The cache and the autograd function are
:mod:`.sparse_product`'s; a layer in a projection group (:mod:`.projections`) runs on its
group's instead.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import nm
from ..backends import Backend, check_backend_name, resolve_backend
from .lowrank import lowrank_add
from .optimizer_hook import install_optimizer_hook, tag_owner
from .sparse_product import SparseProduct, sparse_product


@torch.no_grad()
def store_steps(layers: list["SparseLinear"]) -> None:
    """Write each layer's step count into its ``mask_step`` buffer: two multi-tensor launches per
    distinct count and device, where a fill per layer would leave the GPU waiting on ~150 launches."""
    buffers: dict[tuple[int, torch.device], list[torch.Tensor]] = {}
    for layer in layers:
        buffers.setdefault((layer.step, layer.mask_step.device), []).append(layer.mask_step)
    for (step, _), group in buffers.items():
        torch._foreach_mul_(group, 0)
        torch._foreach_add_(group, step)


def _release(*tensors: torch.Tensor) -> None:
    """Free the tensors' memory (inference keeps what it needs in its frozen operands)."""
    for tensor in tensors:
        tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        tensor.requires_grad_(False)


# host-side counters and caches the training step sets (plain values, never parameters, buffers or modules):
# stored directly, without nn.Module.__setattr__'s checks (0.20 against 1.35 µs a set on a CI-class CPU; a
# llama-1b step sets ~3 per layer at each optimizer step and one per MVUE weight gradient, ~550 in all)
_HOST_STATE = frozenset({"_host_step", "_mvue_calls", "_generation", "_cache", "_dw_operand"})


class SparseLinear(SparseProduct, nn.Module):
    """``Y = X (M⊙W)ᵀ + b`` with an N:M-sparse ``W`` stored as its kept values (SLoPe).

    Args:
        in_features, out_features, bias: as :class:`torch.nn.Linear`.
        pattern: ``"N:M"``; groups of M along ``in`` keep N. ``out_features`` must also be a
            multiple of M (the double pruning groups along ``out``).
        backend: ``"auto"``, ``"reference"`` or ``"cusparselt"``.
        mask_change_freq: re-choose ``W̃ᵀ``'s mask every this many optimizer steps (0: never).
        double_prune: False skips the second pruning: the input gradient uses ``(M⊙W)ᵀ``
            itself, through a dense GEMM (static single-pruned N:M, for comparisons).
        compress: False keeps a dense ``weight`` parameter (same numbers; for debugging).
        cache_operands: keep the derived GEMM operands between uses (False for ZeRO-3, where
            a layer's values exist only while gathered).
        mvue_dw: compute the weight gradient from an unbiased 2:4 sparsification of ``dYᵀ``
            along the tokens (MVUE, as FST), a sparse GEMM on GPUs; its random choices depend
            only on ``mvue_seed``, the optimizer step and the micro-batch, so runs and resumes
            repeat exactly.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, pattern: str = "2:4",
                 backend: str = "auto", mask_change_freq: int = 100, double_prune: bool = True, compress: bool = True,
                 cache_operands: bool = True, mvue_dw: bool = False, mvue_seed: int = 0, device: Any = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.n, self.m = nm.parse_pattern(pattern)
        nm.check_divisible(in_features, self.m, "in_features")
        nm.check_divisible(out_features, self.m, "out_features (double pruning groups along out)")
        if mask_change_freq < 0:
            raise ValueError(f"mask_change_freq must be >= 0 (0 disables mask changes), got {mask_change_freq}")
        self.in_features, self.out_features = in_features, out_features
        self.backend = check_backend_name(backend)
        self.mask_change_freq = int(mask_change_freq)
        self.double_prune = bool(double_prune)
        self.compress = bool(compress)
        self.cache_operands = cache_operands
        self.mvue_dw, self.mvue_seed = bool(mvue_dw), int(mvue_seed)
        self._mvue_calls = 0  # weight gradients taken since the last optimizer step
        factory = {"device": device, "dtype": dtype}
        kept = in_features // self.m * self.n
        if self.compress:
            self.values = nn.Parameter(torch.empty(out_features, kept, **factory))
        else:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.register_buffer("idx", torch.zeros(out_features, kept, dtype=torch.uint8, device=device))
        self.register_buffer("keep_t", torch.zeros(out_features, kept, dtype=torch.bool, device=device))
        self.register_buffer("mask_step", torch.zeros((), dtype=torch.int64, device=device))
        self.adapter_scale = 0.0
        self.engine_managed = False  # set by dsparse.initialize: its engine, not the optimizer hook, counts steps
        self._host_step = 0  # host mirror of mask_step: the schedule never waits on the device
        self._host_adapter_active = False
        self._generation = 0  # bumped whenever the values are known to have changed
        self.dense_mode = False  # dense warm-up: the full dense weight trains (needs compress=False)
        self._cache: tuple[tuple, tuple, Backend, Any] | None = None
        self._inference: tuple[Backend, Any] | None = None  # frozen forward-only operands
        self.projection_group = None  # the dsparse.nn.projections.ProjectionGroup this layer runs in, if any
        self.reset_parameters()
        tag_owner(self._param, self)
        install_optimizer_hook()

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _HOST_STATE:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A copy (``copy.deepcopy``, unpickling) tags its own weight, so torch optimizers step its schedule."""
        super().__setstate__(state)
        tag_owner(self._param, self)

    # ----------------------------------------------------------------- construction
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's initialisation of the dense weight, then magnitude N:M pruning."""
        dense = torch.empty(self.out_features, self.in_features, device=self.idx.device, dtype=self._param.dtype)
        nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
        self.load_dense_weight(dense)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def load_dense_weight(self, dense: torch.Tensor) -> None:
        """Prune a dense ``(out, in)`` weight by magnitude and make it this layer's weight and masks."""
        if dense.shape != (self.out_features, self.in_features):
            raise ValueError(f"dense weight has shape {tuple(dense.shape)}, expected "
                             f"{(self.out_features, self.in_features)}")
        self._choose_masks(dense)
        kept = nm.gather_kept(dense, self.idx, self.m)
        if self.compress:
            self.values.copy_(kept)
        else:
            self.weight.copy_(nm.scatter_kept(kept, self.idx, self.n, self.m))
        self.update_transpose_mask()

    def _choose_masks(self, dense: torch.Tensor) -> None:
        self.idx.copy_(nm.kept_positions(nm.nm_mask(dense.abs().float(), self.n, self.m), self.n, self.m))

    @classmethod
    def from_dense(cls, module: nn.Module, **kwargs: Any) -> "SparseLinear":
        """A SparseLinear pruned from an ``nn.Linear`` or a HF GPT-2 ``Conv1D`` (``y = x W + b``)."""
        weight = module.weight
        if isinstance(module, nn.Linear):
            dense = weight
        elif type(module).__name__ == "Conv1D" and weight.dim() == 2:
            dense = weight.t()
        else:
            raise TypeError(f"cannot sparsify {type(module).__name__}: expected nn.Linear or transformers Conv1D")
        out_features, in_features = dense.shape
        layer = cls(in_features, out_features, bias=module.bias is not None, device=weight.device,
                    dtype=weight.dtype, **kwargs)
        layer.load_dense_weight(dense.detach())
        if module.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(module.bias)
        return layer

    # ----------------------------------------------------------------- state views
    @property
    def _param(self) -> nn.Parameter:
        """The trainable weight tensor: ``values``, or ``weight`` when not compressed."""
        return self._parameters["values" if self.compress else "weight"]

    def kept_values(self) -> torch.Tensor:
        """The kept weights ``(out, in·N/M)`` (a view of ``values``; gathered when not compressed)."""
        return self.values if self.compress else nm.gather_kept(self.weight, self.idx, self.m)

    def _param_grad(self, dvalues: torch.Tensor) -> torch.Tensor:
        return dvalues if self.compress else nm.scatter_kept(dvalues, self.idx, self.n, self.m)

    def effective_weight(self) -> torch.Tensor:
        """Dense ``(out, in)`` view of ``M⊙W``: what the forward multiplies by."""
        return nm.dense_from_kept(self.kept_values(), self.idx, self.n, self.m)

    def effective_weight_t(self) -> torch.Tensor:
        """Dense ``(in, out)`` view of the double-pruned ``W̃ᵀ``: what the input gradient uses."""
        return nm.dense_transpose_from_kept(self.kept_values(), self.idx, self.keep_t, self.n, self.m)

    # ----------------------------------------------------------------- derived state (SparseProduct)
    def _sources(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.kept_values().detach(), self.idx, self.keep_t

    def _positions(self) -> torch.Tensor:
        return self.idx

    def _mask_key(self) -> tuple:
        buffers, param = self._buffers, self._param  # (the dicts directly: this runs on every product's hot path)
        keep_t, idx = buffers["keep_t"], buffers["idx"]
        return (keep_t.data_ptr(), keep_t._version, idx.data_ptr(), idx._version, param.dtype, param.device)

    def _value_key(self) -> tuple:
        param = self._param
        return (param.data_ptr(), param._version, self._generation)

    def _value_addresses(self) -> tuple[int, ...]:
        return (self._param.data_ptr(),)

    def _values_read_in_place(self) -> bool:
        return self.compress  # a dense weight's kept values are gathered anew

    def _resolve_backend(self) -> Backend:
        param = self._param
        return resolve_backend(self.backend, param.device, param.dtype, self.n, self.m, self.out_features,
                               self.in_features, layer=f"SparseLinear({self.in_features}, {self.out_features})")

    def _params(self) -> tuple[torch.Tensor]:
        return (self._param,)

    def _param_grads(self, dvalues: torch.Tensor) -> tuple[torch.Tensor]:
        return (self._param_grad(dvalues),)

    def _adapter_rows(self) -> list[tuple[Any, int]]:
        return [(self if self.adapter_is_active else None, self.out_features)]

    @property
    def refreshes_operands(self) -> bool:
        """Whether this layer keeps GEMM operands that follow its values (sparse training, cached)."""
        return self.cache_operands and not self.dense_mode and self._inference is None

    @property
    def operands_on_cuda(self) -> bool:
        return self._param.is_cuda

    def operand_owner(self) -> SparseProduct:
        """What keeps this layer's operands now: its projection group while that runs, else itself."""
        group = self.projection_group
        return group if group is not None and group.runs_fused else self

    @property
    def _dx_mode(self) -> str:
        return "sparse" if self.double_prune else "dense"

    @torch.no_grad()
    def prepare_inference(self, release_state: bool = True, fold_adapters: bool = True) -> None:
        """Freeze the layer for inference: build the forward operand once, drop the input-gradient one
        (a grouped layer's group builds one for all its layers).

        With ``release_state`` the kept values and masks are freed as well (the compressed
        operand holds everything the forward needs), so the layer's weight memory is the
        compressed operand alone; the layer can no longer train or give a state_dict.
        With ``fold_adapters`` an active adapter joins the forward operand (:mod:`.adapter_fold`):
        one GEMM computes the layer's output, adapter included; its ``A`` and ``B`` are then
        freed with the rest of the state, and it can no longer be switched off.
        """
        if self.projection_group is not None:
            self.projection_group.prepare_inference(release_state, fold_adapters)
        else:
            super().prepare_inference(release_state, fold_adapters)

    def _freeze(self, inference: tuple[Backend, Any]) -> None:
        self._inference = inference
        self._cache = None

    def _release_state(self) -> None:
        _release(self._param, self.idx, self.keep_t)

    def release_adapter(self) -> None:
        """Free the adapter's ``A`` and ``B`` (folded into a frozen forward operand, which holds them)."""
        _release(self.adapter_a, self.adapter_b)

    def _draw_key(self) -> int:
        """The draw key of this micro-batch's MVUE weight gradient: a function of (layer seed, optimizer
        step, micro-batch) only, so runs and resumes reproduce it, independent of the global RNG."""
        key = nm.mvue_key(self.mvue_seed, self._host_step, self._mvue_calls)
        self._mvue_calls += 1
        return key

    def mark_values_changed(self) -> None:
        """Tell the layer its values changed behind autograd's back (refreshes the operands on next use)."""
        self._generation += 1

    # ----------------------------------------------------------------- schedule
    @torch.no_grad()
    def update_transpose_mask(self) -> None:
        """Re-choose ``W̃ᵀ``'s mask by magnitude from the current values (deterministic ties)."""
        if not self.double_prune:
            self.keep_t.fill_(True)
            return
        values = self.kept_values()
        if values.is_cuda and (self.n, self.m) == (2, 4) and values.dtype in (torch.float16, torch.bfloat16,
                                                                               torch.float32):
            from kernels import transpose_keep_and_slots  # one Triton pass, identical to nm.transpose_keep

            self.keep_t.copy_(transpose_keep_and_slots(values.detach(), self.idx)[0])
        else:
            self.keep_t.copy_(nm.transpose_keep(values, self.idx, self.n, self.m))

    def mask_change_due(self) -> bool:
        """Whether the next applied optimizer step re-chooses ``W̃ᵀ``'s mask.

        As in the SLoPe reference, the mask changes after the step whose count (before
        it) satisfies ``step % freq == freq - 1``: after every ``freq``-th step.
        """
        freq = self.mask_change_freq if self.double_prune else 0
        return freq > 0 and self._host_step % freq == freq - 1 and not self.dense_mode

    @torch.no_grad()
    def on_optimizer_step(self, store_step: bool = True) -> bool:
        """Advance the mask schedule by one applied optimizer step; True when ``W̃ᵀ``'s mask was re-chosen.

        ``store_step=False`` leaves the ``mask_step`` buffer to the caller (:func:`store_steps`
        writes many layers' at once)."""
        changed = self.mask_change_due()
        if changed:
            self.update_transpose_mask()
        self.mark_values_changed()
        self._host_step += 1
        self._mvue_calls = 0
        if store_step:
            self.mask_step.fill_(self._host_step)
        return changed

    @torch.no_grad()
    def reprune(self) -> None:
        """Choose both masks anew from the current dense weight (the end of a dense warm-up).

        Entries outside the new mask stay in the dense storage but are never used again.
        """
        if self.compress:
            raise RuntimeError("reprune needs the dense weight: build the layer with compress=False")
        self._choose_masks(self.weight)
        self.update_transpose_mask()
        self.mark_values_changed()

    @property
    def step(self) -> int:
        """Optimizer steps this layer has seen (the mask schedule's clock)."""
        return self._host_step

    # ----------------------------------------------------------------- adapters
    def add_adapter(self, rank: int, alpha: float = 1.0, active: bool = True,
                    generator: torch.Generator | None = None) -> None:
        """Add a low-rank adapter ``Y += (X Aᵀ) Bᵀ · alpha / rank`` (SLoPe's lazy adapters).

        ``A`` starts random (LoRA's Kaiming-uniform), ``B`` at zero, so adding it does
        not change the output. An inactive adapter is skipped by the forward (and so
        gets no gradient) until :meth:`set_adapter_active`.
        """
        if rank < 1:
            raise ValueError(f"adapter rank must be >= 1, got {rank}")
        if hasattr(self, "adapter_a"):
            raise RuntimeError("this layer already has an adapter")
        param = self._param
        a = torch.empty(rank, self.in_features, dtype=torch.float32)
        bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform(a=sqrt(5)), as LoRA
        a.uniform_(-bound, bound, generator=generator)
        self.adapter_a = nn.Parameter(a.to(device=param.device, dtype=param.dtype))
        self.adapter_b = nn.Parameter(torch.zeros(self.out_features, rank, device=param.device, dtype=param.dtype))
        self.register_buffer("adapter_active", torch.tensor(bool(active), device=param.device))
        self._host_adapter_active = bool(active)
        self._adapter_rank = rank
        self.adapter_scale = alpha / rank

    @property
    def has_adapter(self) -> bool:
        return hasattr(self, "adapter_a")

    @property
    def adapter_rank(self) -> int:
        """The adapter's rank (0 without one), as added (ZeRO-3 partitions ``A`` and a folded adapter frees it)."""
        return self._adapter_rank if self.has_adapter else 0

    @property
    def adapter_is_active(self) -> bool:
        return self.has_adapter and self._host_adapter_active

    def set_adapter_active(self, active: bool = True) -> None:
        if not self.has_adapter:
            raise RuntimeError("this layer has no adapter; call add_adapter first")
        if self.operand_owner()._fold is not None:
            raise RuntimeError("this layer's adapter is folded into its inference operand (prepare_inference with "
                               "fold_adapters=True); freeze it with fold_adapters=False to switch adapters")
        self._host_adapter_active = bool(active)
        self.adapter_active.fill_(bool(active))

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, this layer expects {self.in_features}")
        if self.dense_mode:
            return F.linear(x, self.weight, self.bias)
        group = self.projection_group
        if group is not None and group.runs_fused:
            y = group.output(self, x)
            if group.adds_adapters:  # the group's product includes this layer's adapter
                return y
        elif self._fold is not None:  # frozen, the adapter inside the forward operand
            return self._frozen_forward(x, self.bias)
        else:
            y = sparse_product(x, self.bias, self, self._params())
        if self.adapter_is_active:
            y = lowrank_add(y, F.linear(x, self.adapter_a), self.adapter_b, self.adapter_scale)
        return y

    # ----------------------------------------------------------------- state dict
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.sync_host_state()

    def sync_host_state(self) -> None:
        """Refresh the host mirrors of ``mask_step`` and ``adapter_active`` from the buffers."""
        self._host_step = int(self.mask_step)
        if self.has_adapter:
            self._host_adapter_active = bool(self.adapter_active)

    def sparsity_signature(self) -> dict[str, Any]:
        """What a checkpoint must agree on to load into this layer."""
        return {"pattern": f"{self.n}:{self.m}", "in": self.in_features, "out": self.out_features,
                "compress": self.compress, "double_prune": self.double_prune, "adapter_rank": self.adapter_rank}

    def extra_repr(self) -> str:
        text = (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"pattern={self.n}:{self.m}, backend={self.backend}, mask_change_freq={self.mask_change_freq}")
        if not self.compress:
            text += ", compress=False"
        if not self.double_prune:
            text += ", double_prune=False"
        if self.mvue_dw:
            text += ", mvue_dw=True"
        if self.has_adapter:
            text += f", adapter_rank={self.adapter_rank}, adapter_active={self._host_adapter_active}"
        return text
