"""N:M structured sparsity: masks, double pruning, and dense <-> kept-values conversion.

Conventions used everywhere in dsparse:

* A weight ``W`` has shape ``(out, in)``; its N:M mask groups ``M`` consecutive entries
  along ``in`` (the GEMM's reduction dim) and keeps the ``N`` of largest magnitude.
* The *kept values* of ``W`` are a dense tensor of shape ``(out, in * N / M)``: for each
  group, its ``N`` kept entries in ascending position order. ``idx`` (uint8, same shape)
  holds each kept entry's position inside its group (``0 .. M-1``).
* The *double-pruned transpose* ``W̃ᵀ`` (shape ``(in, out)``) is ``(M⊙W)ᵀ`` pruned again
  N:M along ``out``. Its support lies inside ``W``'s, so it is stored as a boolean
  ``keep_t`` over the kept values (same shape as ``idx``).

All selections break magnitude ties by position (the lower index wins) through a stable
sort, so every rank, CPU or GPU, derives the same mask from the same values.
"""
from __future__ import annotations

import re

import torch

__all__ = [
    "parse_pattern",
    "check_divisible",
    "nm_mask",
    "kept_positions",
    "gather_kept",
    "scatter_kept",
    "transpose_keep",
    "dense_from_kept",
    "dense_transpose_from_kept",
]

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Parse ``"2:4"`` (or ``(2, 4)``) into ``(n, m)`` and validate it (``0 < n < m``)."""
    if isinstance(pattern, str):
        match = _PATTERN.match(pattern)
        if not match:
            raise ValueError(f"sparsity pattern {pattern!r} is not of the form 'N:M' (e.g. '2:4')")
        n, m = int(match.group(1)), int(match.group(2))
    elif isinstance(pattern, (tuple, list)) and len(pattern) == 2:
        n, m = int(pattern[0]), int(pattern[1])
    else:
        raise ValueError(f"sparsity pattern {pattern!r} is not of the form 'N:M' (e.g. '2:4')")
    if not 0 < n < m:
        raise ValueError(
            f"sparsity pattern '{n}:{m}' is invalid: it needs 0 < N < M "
            "(keep N of every M weights), e.g. '2:4', '1:4' or '2:8'"
        )
    if m > 255:
        raise ValueError(f"sparsity pattern '{n}:{m}': M must be at most 255 (positions are uint8)")
    return n, m


def check_divisible(size: int, m: int, what: str) -> None:
    """Raise a ValueError naming ``what`` when ``size`` is not a multiple of the group size ``m``."""
    if size % m:
        raise ValueError(
            f"{what} = {size} is not divisible by the N:M group size M = {m}; "
            f"pad it to a multiple of {m}, choose another pattern, or exclude the layer"
        )


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest ``scores`` of every ``m`` consecutive ones along the last dim.

    Ties go to the lower position (stable sort), which makes the mask a deterministic
    function of ``scores`` on every device.
    """
    *lead, d = scores.shape
    check_divisible(d, m, "the grouped dimension")
    groups = scores.reshape(*lead, d // m, m)
    top = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(-1, top, True)
    return mask.reshape(scores.shape)


def kept_positions(mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Positions (uint8, ascending within each group) of an N:M mask with exactly ``n`` per group."""
    *lead, d = mask.shape
    groups = mask.reshape(*lead, d // m, m)
    counts = groups.sum(-1)
    if not bool((counts == n).all()):
        raise ValueError(f"mask does not keep exactly {n} of every {m} entries")
    pos = torch.arange(m, device=mask.device).expand_as(groups)
    # kept entries sort before dropped ones; stable sort keeps positions ascending
    order = torch.sort((~groups).to(torch.uint8), dim=-1, stable=True).indices[..., :n]
    return torch.gather(pos, -1, order).to(torch.uint8).reshape(*lead, d // m * n)


def gather_kept(dense: torch.Tensor, idx: torch.Tensor, m: int) -> torch.Tensor:
    """Kept values ``(.., d*n/m)`` of ``dense`` ``(.., d)`` at the positions ``idx``."""
    *lead, k = idx.shape
    d = dense.shape[-1]
    n = k * m // d
    groups = dense.reshape(*lead, d // m, m)
    return torch.gather(groups, -1, idx.long().reshape(*lead, d // m, n)).reshape(*lead, k)


def scatter_kept(values: torch.Tensor, idx: torch.Tensor, n: int, m: int, fill: float = 0.0) -> torch.Tensor:
    """Dense ``(.., d)`` tensor with ``values`` at the positions ``idx`` and ``fill`` elsewhere."""
    *lead, k = values.shape
    groups = k // n
    out = torch.full((*lead, groups, m), fill, dtype=values.dtype, device=values.device)
    out.scatter_(-1, idx.long().reshape(*lead, groups, n), values.reshape(*lead, groups, n))
    return out.reshape(*lead, groups * m)


def transpose_keep(values: torch.Tensor, idx: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Which kept values survive the second pruning (``(M⊙W)ᵀ`` pruned N:M along ``out``).

    Pruned entries score -1, below any kept magnitude, so the result's support always
    lies inside ``W``'s even where kept values are exactly zero.
    """
    out_features = values.shape[0]
    check_divisible(out_features, m, "out_features (double pruning groups along out)")
    scores = scatter_kept(values.detach().abs().float(), idx, n, m, fill=-1.0)
    mask_t = nm_mask(scores.t(), n, m)  # (in, out), grouped along out
    return gather_kept(mask_t.t(), idx, m)


def dense_from_kept(values: torch.Tensor, idx: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The dense ``(out, in)`` view of ``M⊙W``."""
    return scatter_kept(values, idx, n, m)


def dense_transpose_from_kept(
    values: torch.Tensor, idx: torch.Tensor, keep_t: torch.Tensor, n: int, m: int
) -> torch.Tensor:
    """The dense ``(in, out)`` view of the double-pruned ``W̃ᵀ`` (a transposed view)."""
    return scatter_kept(torch.where(keep_t, values, torch.zeros_like(values)), idx, n, m).t()


# The MVUE draws: a counter-based hash (Wellons' "lowbias32" mix, twice) of (key, row, pair), so the
# Triton kernels draw in registers what this code draws on the CPU, bit for bit, with no random
# tensor written and read (it was as large as dYᵀ in fp32). 32-bit products are formed from
# 16-bit halves so int64 arithmetic never overflows.
MVUE_MIX = (0x7FEB352D, 0x846CA68B)
MVUE_KEY_BITS = 31


def mvue_key(*parts: int) -> int:
    """A draw key (31 bits) from integers, e.g. (layer seed, optimizer step, micro-batch)."""
    return hash(tuple(parts)) & ((1 << MVUE_KEY_BITS) - 1)


def _mix32(h: torch.Tensor) -> torch.Tensor:
    for shift, c in ((16, MVUE_MIX[0]), (15, MVUE_MIX[1])):
        h = h ^ (h >> shift)
        h = (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF
    return h ^ (h >> 16)


def mvue_uniform(key: int, rows: int, pairs: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform ``[0, 1)`` fp32 draws ``(rows, pairs)`` for :func:`mvue_pairs`, a function of ``key``
    and the position only: ``mix(pair ^ mix(row ^ key)) >> 8`` times ``2**-24`` (what the kernels draw)."""
    if not 0 <= key < 1 << MVUE_KEY_BITS:
        raise ValueError(f"mvue_uniform: key must be in [0, 2**{MVUE_KEY_BITS}), got {key}")
    row = _mix32(torch.arange(rows, device=device)[:, None] ^ key)
    return (_mix32(torch.arange(pairs, device=device)[None, :] ^ row) >> 8).to(torch.float32) * 2.0**-24


def mvue_pairs_kept(t: torch.Tensor, rand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mvue_pairs` as its survivors: per pair of ``t``'s last dim, the kept value (``t``'s
    dtype) and whether it is the pair's first entry (bool), each of shape ``(..., t.shape[-1] // 2)``.

    A pair of two zeros keeps its first entry, as zero. The form a compressed 2:4 operand stores.
    """
    if t.shape[-1] % 2:
        raise ValueError(f"mvue_pairs needs an even last dimension, got shape {tuple(t.shape)}")
    pairs = t.float().reshape(*t.shape[:-1], -1, 2)
    mag = pairs.abs()
    total = mag.sum(-1)
    # u < |a| / total, as a product (one fp32 rounding, the same in every kernel; no division)
    first = (rand * total < mag[..., 0]) | (total == 0)
    value = torch.sign(torch.where(first, pairs[..., 0], pairs[..., 1])) * total
    return value.to(t.dtype), first


def mvue_pairs(t: torch.Tensor, rand: torch.Tensor) -> torch.Tensor:
    """Unbiased 1:2 (hence 2:4) sparsification of ``t`` along its last dim, of minimum variance.

    In each pair ``(a, b)`` one entry survives, ``a`` with probability ``|a| / (|a| + |b|)``,
    and it becomes ``sign · (|a| + |b|)``, so the expectation is ``t`` itself (Chmiel et al.,
    "Minimum variance unbiased N:M sparsity for the neural gradients", as in FST). ``rand``:
    uniform ``[0, 1)`` numbers of shape ``(*t.shape[:-1], t.shape[-1] // 2)``. Computed in fp32,
    returned in ``t``'s dtype.
    """
    value, first = mvue_pairs_kept(t, rand)
    zero = torch.zeros_like(value)
    return torch.stack([torch.where(first, value, zero), torch.where(first, zero, value)], dim=-1).reshape(t.shape)
