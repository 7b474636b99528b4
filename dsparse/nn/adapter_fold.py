"""Adapters folded into a frozen product's forward operand: one sparse GEMM gives ``X Wᵀ + s·(X Aᵀ) Bᵀ``.

Run apart, an active adapter costs a skinny GEMM ``U = X Aᵀ`` and a pass over the whole output
adding ``s·U Bᵀ`` (a llama-1b prefill at rank 1.56% on an H200: ~12 of 59 ms,
``bench/results/infer_h200.json``). Folded for inference, the adapter's dense ``C = s·B`` joins
the N:M operand as extra input columns holding ``U``:

    Y = [X | U'] · [M⊙W | C']ᵀ = X (M⊙W)ᵀ + U Cᵀ

An N:M row keeps N of every M inputs, so each group of M extra columns has M/N *lanes* of N
columns, and a row reads one lane per group. ``U`` is cut into slots of N values; slot ``t`` of
a layer goes to one lane of one group, a layer's slots to distinct groups (laid out lane after
lane, wrapping around: McNaughton's rule), and that layer's rows keep that lane there with its
``C`` values; elsewhere they keep zeros. So gate/up's two adapters share the groups (gate's in
lane 0, up's in lane 1 for 2:4) and add ``Σ r`` columns; a lone adapter adds ``M/N · r`` (its
other lanes read zero columns). ``A'`` (the ``A`` rows in that column order, zero rows for
unused lanes) makes all of ``U'`` in one GEMM. The output pass is gone; the sparse GEMMs read
64 more columns at rank 1.56% of llama-1b (3% of 2048). Whoever produces ``X`` may write it
straight into the wide input (:func:`input_slot`: the fused RMSNorm and SwiGLU gate do); any
other input is copied in. Inference only: a folded product gives ``A`` and ``B`` no gradient.
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn as nn

_K_MULTIPLE = 16  # the extra columns keep the operand's in a multiple of this (cuSPARSELt's minimum)


class AdapterFold:
    """The wide input of a folded product: ``[X | U']`` with ``U' = X A'ᵀ`` written by one GEMM."""

    def __init__(self, a_wide: torch.Tensor, in_features: int) -> None:
        self.a_wide = a_wide  # (extra columns, in): the A rows in U' column order, zero rows for unused lanes
        self.in_features = in_features
        self.width = in_features + a_wide.shape[0]
        self._buffer: weakref.ref | None = None  # the last wide input handed out

    def input_buffer(self, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A new wide input ``(rows, width)``; the caller writes ``X`` into its first ``in`` columns
        and passes that slice (or a view of it) on as the product's input."""
        buffer = torch.empty(rows, self.width, dtype=dtype, device=device)
        self._buffer = weakref.ref(buffer)
        return buffer

    def holds(self, x2d: torch.Tensor) -> bool:
        """Whether ``x2d`` is the ``X`` slot of the last :meth:`input_buffer`, so ``U'`` can go beside it."""
        buffer = self._buffer() if self._buffer is not None else None
        return (buffer is not None and x2d._base is buffer and x2d.data_ptr() == buffer.data_ptr()
                and x2d.shape == (buffer.shape[0], self.in_features) and x2d.stride() == (self.width, 1))

    def wide_input(self, x2d: torch.Tensor) -> torch.Tensor:
        """``[X | U']`` for ``x2d`` ``(tokens, in)``: around ``x2d`` where it is a slot, else a copy."""
        if self.holds(x2d):
            wide = x2d._base
        else:
            wide = self.input_buffer(x2d.shape[0], x2d.dtype, x2d.device)
            wide[:, : self.in_features].copy_(x2d)
        torch.mm(wide[:, : self.in_features], self.a_wide.t(), out=wide[:, self.in_features:])
        return wide


def foldable(n: int, m: int) -> bool:
    """Whether an N:M operand splits into lanes: N divides M."""
    return m % n == 0


def fold_groups(slots: list[int], n: int, m: int) -> int:
    """Groups of M extra columns for adapters of ``slots`` slots (N values each): room for every slot, one
    group per slot of the largest, and the extra columns a multiple of 16 (cuSPARSELt's minimum)."""
    groups = max(max(slots), -(-sum(slots) // (m // n)))
    step = _K_MULTIPLE // math.gcd(_K_MULTIPLE, m)
    return -(-groups // step) * step


@torch.no_grad()
def fold(values: torch.Tensor, idx: torch.Tensor, keep_t: torch.Tensor, adapters: list[nn.Module | None],
         sizes: list[int], n: int, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AdapterFold]:
    """The kept values, positions and ``keep_t`` of ``[M⊙W | C']``, and the fold that makes its input.

    ``values``/``idx``/``keep_t`` ``(out, in·N/M)`` are the product's; ``adapters[i]`` is the layer
    (``adapter_a``, ``adapter_b``, ``adapter_scale``) whose adapter adds onto the next ``sizes[i]`` rows
    of the output, or None for rows without one.
    """
    slots = [0 if layer is None else -(-layer.adapter_a.shape[0] // n) for layer in adapters]
    groups = fold_groups(slots, n, m)
    out, in_features = values.shape[0], idx.shape[1] * m // n
    compute = torch.promote_types(values.dtype, torch.float32)
    a_wide = torch.zeros(groups * m, in_features, dtype=values.dtype, device=values.device)
    ext_values = torch.zeros(out, groups, n, dtype=values.dtype, device=values.device)
    ext_idx = torch.arange(n, dtype=torch.uint8, device=idx.device).repeat(out, groups, 1)  # unused: any N positions
    within = torch.arange(n, device=values.device)
    position = row = 0
    for layer, size, count in zip(adapters, sizes, slots):
        if layer is not None:
            rank = layer.adapter_a.shape[0]
            at = position + torch.arange(count, device=values.device)  # lane-major slot positions
            group, lane = at % groups, at // groups
            columns = (group * m + lane * n)[:, None] + within  # (count, N) extra columns of each slot
            a = torch.zeros(count * n, in_features, dtype=values.dtype, device=values.device)
            a[:rank] = layer.adapter_a
            a_wide[columns.reshape(-1)] = a
            c = torch.zeros(size, count * n, dtype=compute, device=values.device)
            c[:, :rank] = layer.adapter_b.to(compute) * layer.adapter_scale
            ext_values[row:row + size, group] = c.to(values.dtype).view(size, count, n)
            ext_idx[row:row + size, group] = ((lane * n)[:, None] + within).to(torch.uint8)
            position += count
        row += size
    wide_values = torch.cat([values, ext_values.view(out, -1)], dim=1)
    wide_idx = torch.cat([idx, ext_idx.view(out, -1)], dim=1)
    wide_keep_t = torch.cat([keep_t, keep_t.new_zeros(out, groups * n)], dim=1)
    return wide_values, wide_idx, wide_keep_t, AdapterFold(a_wide, in_features)


def input_slot(layer: nn.Module, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """Where a producer of ``layer``'s ``(rows, in)`` input may write it so that ``layer``'s folded adapters
    need no copy of it: the ``X`` slot of a new wide input, or None when ``layer`` does not fold."""
    owner = layer.operand_owner() if hasattr(layer, "operand_owner") else None
    folded = getattr(owner, "_fold", None)
    if folded is None:
        return None
    return folded.input_buffer(rows, dtype, device)[:, : folded.in_features]
