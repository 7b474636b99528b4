"""Kept values of a dense N:M-masked matrix at uint8 positions, in one pass: the weight gradient's
reduction to the kept entries (``dsparse.nm.gather_kept`` without its int64 index copy).

Each program owns a ``BLOCK_R x BLOCK_K`` tile of the output: it loads the uint8 positions,
turns them into source columns ``(k // N) * M + pos`` and gathers from the dense rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import DualKernel, check_2d, check_same_device

__all__ = ["gather_kept", "gather_kept_reference"]

CONFIG = {"BLOCK_R": 32, "BLOCK_K": 128, "num_warps": 4}


def _gather_kept_kernel(
    d_ptr, i_ptr, o_ptr, rows, kept,
    sd0, sd1, si0, si1, so0, so1,
    N: tl.constexpr, M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    k = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K))[None, :]
    mask = (r < rows) & (k < kept)
    pos = tl.load(i_ptr + r * si0 + k * si1, mask=mask, other=0).to(tl.int32)
    src = (k // N) * M + pos
    value = tl.load(d_ptr + r * sd0 + src * sd1, mask=mask, other=0)
    tl.store(o_ptr + r * so0 + k * so1, value, mask=mask)


_KERNEL = DualKernel(_gather_kept_kernel)


def gather_kept_reference(dense: torch.Tensor, idx: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Pure torch: ``out[r, k] = dense[r, (k // n) * m + idx[r, k]]``."""
    rows, kept = idx.shape
    src = (torch.arange(kept, device=dense.device) // n * m).expand(rows, kept) + idx.long()
    return torch.gather(dense, 1, src)


def gather_kept(dense: torch.Tensor, idx: torch.Tensor, n: int, m: int, *, out: torch.Tensor | None = None,
                config: dict[str, int] | None = None) -> torch.Tensor:
    """The entries of ``dense`` ``(rows, cols)`` at the N:M positions ``idx`` (uint8, ``(rows, cols*n/m)``).

    Equal to :func:`gather_kept_reference` and ``dsparse.nm.gather_kept``. ``out``: write
    there (any strides). CPU tensors run through the Triton interpreter (slow: for tests).
    """
    what = "gather_kept"
    check_2d(what, "dense", dense)
    rows, cols = dense.shape
    if not 0 < n < m or cols % m:
        raise ValueError(f"{what}: {cols} columns do not form groups of M = {m} (with 0 < N = {n} < M)")
    kept = cols // m * n
    check_2d(what, "idx", idx, shape=(rows, kept), dtypes=(torch.uint8,))
    if out is None:
        out = torch.empty(rows, kept, dtype=dense.dtype, device=dense.device)
    else:
        check_2d(what, "out", out, shape=(rows, kept), dtypes=(dense.dtype,))
    check_same_device(what, dense, idx=idx, out=out)
    if out.numel() == 0:
        return out
    cfg = {**CONFIG, **(config or {})}
    grid = (triton.cdiv(rows, cfg["BLOCK_R"]), triton.cdiv(kept, cfg["BLOCK_K"]))
    _KERNEL.launch(dense.device, grid, dense, idx, out, rows, kept, dense.stride(0), dense.stride(1),
                   idx.stride(0), idx.stride(1), out.stride(0), out.stride(1), N=n, M=m, **cfg)
    return out
