"""Kept values of a dense N:M-masked matrix at uint8 positions, in one pass: the weight gradient's
reduction to the kept entries (``dsparse.nm.gather_kept`` without its int64 index copy).

Each program owns ``BLOCK_R`` rows x ``BLOCK_G`` groups. It loads the dense tile whole
(``[rows, groups, M]``, contiguous vector loads) and the positions (``[rows, groups, N]``) and
picks each kept value from its group's ``M`` entries in registers (``tl.gather`` along the
lanes). A gather load per value (2 bytes per load instruction) ran at a third of the
memory bandwidth.
"""
from __future__ import annotations

import torch
import triton.language as tl

from ._triton import DualKernel, cdiv, check_2d, check_same_device, next_power_of_2

__all__ = ["gather_kept", "gather_kept_reference"]

CONFIG = {"BLOCK_R": 32, "BLOCK_G": 64, "num_warps": 4}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _gather_kept_kernel(
    d_ptr, i_ptr, o_ptr, rows, groups,
    sd0, sd1, si0, si1, so0, so1,
    N: tl.constexpr, M: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
):
    # [rows, groups, lane] tiles; NP and MP are N and M rounded up to powers of two (lanes past them masked).
    # Where they are N and M, the tiles load as 2-D row segments and reshape: loads whose offsets are
    # 3-D get a layout with a warp across rows, not along them (uncoalesced).
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    g0 = tl.program_id(1) * BLOCK_G
    if M == MP:
        c = g0 * M + tl.arange(0, BLOCK_G * M)[None, :]
        dense = tl.load(d_ptr + r * sd0 + c * sd1, mask=(r < rows) & (c < groups * M), other=0)
        dense = tl.reshape(dense, [BLOCK_R, BLOCK_G, M])
    else:
        g = (g0 + tl.arange(0, BLOCK_G))[None, :, None]
        lane = tl.arange(0, MP)[None, None, :]
        dense = tl.load(d_ptr + r[:, :, None] * sd0 + (g * M + lane) * sd1,
                        mask=(r[:, :, None] < rows) & (g < groups) & (lane < M), other=0)
    if N == NP:
        k = g0 * N + tl.arange(0, BLOCK_G * N)[None, :]
        kept = (r < rows) & (k < groups * N)
        pos = tl.load(i_ptr + r * si0 + k * si1, mask=kept, other=0).to(tl.int32)
        picked = tl.gather(dense, tl.reshape(pos, [BLOCK_R, BLOCK_G, N]), 2)
        tl.store(o_ptr + r * so0 + k * so1, tl.reshape(picked, [BLOCK_R, BLOCK_G * N]), mask=kept)
    else:
        g = (g0 + tl.arange(0, BLOCK_G))[None, :, None]
        lane = tl.arange(0, NP)[None, None, :]
        k = g * N + lane
        kept = (r[:, :, None] < rows) & (g < groups) & (lane < N)
        pos = tl.load(i_ptr + r[:, :, None] * si0 + k * si1, mask=kept, other=0).to(tl.int32)
        tl.store(o_ptr + r[:, :, None] * so0 + k * so1, tl.gather(dense, pos, 2), mask=kept)


_KERNEL = DualKernel(_gather_kept_kernel)


def gather_kept_reference(dense: torch.Tensor, idx: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Pure torch: ``out[r, k] = dense[r, (k // n) * m + idx[r, k]]``."""
    rows, kept = idx.shape
    src = (torch.arange(kept, device=dense.device) // n * m).expand(rows, kept) + idx.long()
    return torch.gather(dense, 1, src)


def kept_output(what: str, like: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None, rows: int, kept: int,
                **inputs: torch.Tensor) -> torch.Tensor:
    """Check the positions ``idx`` (uint8 ``(rows, kept)``) and ``out`` (or make it: ``like``'s dtype and
    device) of a kernel writing kept entries, all on ``like``'s device with ``inputs``; returns ``out``."""
    check_2d(what, "idx", idx, shape=(rows, kept), dtypes=(torch.uint8,))
    if out is None:
        out = torch.empty(rows, kept, dtype=like.dtype, device=like.device)
    else:
        check_2d(what, "out", out, shape=(rows, kept), dtypes=(like.dtype,))
    check_same_device(what, like, idx=idx, out=out, **inputs)
    return out


def gather_kept(dense: torch.Tensor, idx: torch.Tensor, n: int, m: int, *, out: torch.Tensor | None = None,
                config: dict[str, int] | None = None) -> torch.Tensor:
    """The entries of ``dense`` ``(rows, cols)`` at the N:M positions ``idx`` (uint8, ``(rows, cols*n/m)``).

    Equal to :func:`gather_kept_reference` and ``dsparse.nm.gather_kept``. ``out``: write
    there (any strides). CPU tensors run through the Triton interpreter (slow: for tests).
    """
    what = "gather_kept"
    check_2d(what, "dense", dense, dtypes=_DTYPES)
    rows, cols = dense.shape
    if not 0 < n < m or cols % m:
        raise ValueError(f"{what}: {cols} columns do not form groups of M = {m} (with 0 < N = {n} < M)")
    kept = cols // m * n
    out = kept_output(what, dense, idx, out, rows, kept)
    if out.numel() == 0:
        return out
    cfg = {**CONFIG, **(config or {})}
    groups = cols // m
    grid = (cdiv(rows, cfg["BLOCK_R"]), cdiv(groups, cfg["BLOCK_G"]))
    _KERNEL.launch(dense.device, grid, dense, idx, out, rows, groups, dense.stride(0), dense.stride(1),
                   idx.stride(0), idx.stride(1), out.stride(0), out.stride(1), N=n, M=m,
                   NP=next_power_of_2(n), MP=next_power_of_2(m), **cfg)
    return out
