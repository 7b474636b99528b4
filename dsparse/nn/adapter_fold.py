"""Adapters folded into a frozen product's forward operand: one sparse GEMM gives ``X Wᵀ + s·(X Aᵀ) Bᵀ``.

Run apart, an active adapter costs a skinny GEMM ``U = X Aᵀ`` and a pass over the whole output
adding ``s·U Bᵀ`` (a llama-1b prefill at rank 1.56% on an H200: ~12 of 59 ms,
``bench/results/infer_h200.json``). Folded for inference, the adapter's dense ``C = s·B``
``(out, R)`` joins the N:M operand as ``R·M/N`` more input columns. An N:M row keeps N of
every M inputs, so ``C`` is written M/N times, copy ``j`` keeping positions ``jN .. jN+N-1``
of each group of M columns, and the input repeats ``U`` as often:

    Y = [X | U | U] · [M⊙W | C_0 | C_1]ᵀ = X (M⊙W)ᵀ + U Cᵀ        (2:4: two copies)

The output pass is gone; the GEMM reads ``R·M/N`` more columns (3% at rank 1.56% of a
2048-wide layer). A projection group's adapters stack: its ``A``s one above the other, ``C``
block-diagonal. Whoever produces ``X`` may write it straight into the wide input
(:func:`input_slot`: the fused RMSNorm and SwiGLU gate do); any other input is copied in.
Inference only: a folded product gives ``A`` and ``B`` no gradient.
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn as nn

_K_MULTIPLE = 16  # the extra columns keep the operand's in a multiple of this (cuSPARSELt's minimum)


class AdapterFold:
    """The wide input of a folded product: ``[X | U | U ..]`` with ``U = X Aᵀ`` written by one GEMM."""

    def __init__(self, a: torch.Tensor, in_features: int, copies: int) -> None:
        self.a_repeated = a.repeat(copies, 1).contiguous()  # (copies·R, in): one GEMM writes every copy of U
        self.in_features = in_features
        self.width = in_features + self.a_repeated.shape[0]
        self._buffer: weakref.ref | None = None  # the last wide input handed out

    def input_buffer(self, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A new wide input ``(rows, width)``; the caller writes ``X`` into its first ``in`` columns
        and passes that slice (or a view of it) on as the product's input."""
        buffer = torch.empty(rows, self.width, dtype=dtype, device=device)
        self._buffer = weakref.ref(buffer)
        return buffer

    def holds(self, x2d: torch.Tensor) -> bool:
        """Whether ``x2d`` is the ``X`` slot of the last :meth:`input_buffer`, so ``U`` can go beside it."""
        buffer = self._buffer() if self._buffer is not None else None
        return (buffer is not None and x2d._base is buffer and x2d.data_ptr() == buffer.data_ptr()
                and x2d.shape == (buffer.shape[0], self.in_features) and x2d.stride() == (self.width, 1))

    def wide_input(self, x2d: torch.Tensor) -> torch.Tensor:
        """``[X | U | U ..]`` for ``x2d`` ``(tokens, in)``: around ``x2d`` where it is a slot, else a copy."""
        if self.holds(x2d):
            wide = x2d._base
        else:
            wide = self.input_buffer(x2d.shape[0], x2d.dtype, x2d.device)
            wide[:, : self.in_features].copy_(x2d)
        torch.mm(wide[:, : self.in_features], self.a_repeated.t(), out=wide[:, self.in_features:])
        return wide


def foldable(n: int, m: int) -> bool:
    """Whether an N:M operand can hold a dense block: N divides M (M/N copies cover every position)."""
    return m % n == 0


def folded_rank(rank: int, n: int, m: int) -> int:
    """``rank`` padded (zero columns) so that the copies fill whole groups and keep ``in`` a multiple of 16."""
    copies = m // n
    step = math.lcm(m, _K_MULTIPLE // math.gcd(_K_MULTIPLE, copies))
    return -(-rank // step) * step


@torch.no_grad()
def fold(values: torch.Tensor, idx: torch.Tensor, keep_t: torch.Tensor, adapters: list[nn.Module | None],
         sizes: list[int], n: int, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AdapterFold]:
    """The kept values, positions and ``keep_t`` of ``[M⊙W | C_0 | C_1 ..]``, and the fold that makes its input.

    ``values``/``idx``/``keep_t`` ``(out, in·N/M)`` are the product's; ``adapters[i]`` is the layer
    (``adapter_a``, ``adapter_b``, ``adapter_scale``) whose adapter adds onto rows ``sizes[i]`` of the
    output, or None for rows without one.
    """
    active = [layer for layer in adapters if layer is not None]
    rank = folded_rank(sum(layer.adapter_a.shape[0] for layer in active), n, m)
    out, in_features = values.shape[0], idx.shape[1] * m // n
    c = torch.zeros(out, rank, dtype=torch.promote_types(values.dtype, torch.float32), device=values.device)
    a = torch.zeros(rank, in_features, dtype=values.dtype, device=values.device)
    row = col = 0
    for layer, size in zip(adapters, sizes):
        if layer is not None:
            r = layer.adapter_a.shape[0]
            c[row:row + size, col:col + r] = layer.adapter_b.to(c.dtype) * layer.adapter_scale
            a[col:col + r] = layer.adapter_a
            col += r
        row += size
    copies = m // n
    groups = c.to(values.dtype).view(out, rank // m, m)
    positions = torch.arange(m, dtype=torch.uint8, device=idx.device).expand(out, rank // m, m)
    ext_values = [groups[:, :, j * n:(j + 1) * n].reshape(out, -1) for j in range(copies)]
    ext_idx = [positions[:, :, j * n:(j + 1) * n].reshape(out, -1) for j in range(copies)]
    wide_values = torch.cat([values, *ext_values], dim=1)
    wide_idx = torch.cat([idx, *ext_idx], dim=1)
    wide_keep_t = torch.cat([keep_t, keep_t.new_zeros(out, wide_idx.shape[1] - keep_t.shape[1])], dim=1)
    return wide_values, wide_idx, wide_keep_t, AdapterFold(a, in_features, copies)


def input_slot(layer: nn.Module, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """Where a producer of ``layer``'s ``(rows, in)`` input may write it so that ``layer``'s folded adapters
    need no copy of it: the ``X`` slot of a new wide input, or None when ``layer`` does not fold."""
    owner = layer.operand_owner() if hasattr(layer, "operand_owner") else None
    folded = getattr(owner, "_fold", None)
    if folded is None:
        return None
    return folded.input_buffer(rows, dtype, device)[:, : folded.in_features]

