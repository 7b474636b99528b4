"""The exact weight gradient at the kept N:M entries in one kernel: ``(dYᵀ X)`` reduced to the positions
``idx`` in the GEMM's epilogue.

The unfused way (``dsparse.backends.base.Backend.grad_values``) is cuBLAS's dense ``dYᵀ X``, written
out as an ``(out, in)`` matrix, then :func:`kernels.gather_kept` reading it back for the kept half:
at 4096x4096 and 4096 tokens that pass and the dense temporary took the weight gradient from 0.19 ms
(dense's) to 0.25 ms on an H100 (``layer_h100.json``), the one product no plan could fall back on.
Here each program accumulates a ``BLOCK_R x BLOCK_C`` tile of ``dYᵀ X`` over the tokens in fp32
(tensor cores for fp16/bf16), picks each group's kept entries from its ``M`` accumulators in
registers (``tl.gather``) and stores only those, rounded once. Tiles with ``"TMA"`` read ``dY``
and ``X`` through Hopper's tensor memory accelerator (host-built tensor descriptors: whole tiles
copied asynchronously into shared memory, zeros past every edge, no address registers), the
others with pointer loads. Which way runs is a per-shape plan (role ``"dw"``,
:mod:`dsparse.backends.plans`), chosen by measurement among :data:`TILES`.
"""
from __future__ import annotations

import functools

import torch
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._triton import DualKernel, cdiv, check_2d
from .gather import gather_kept_reference, kept_output

__all__ = ["DEFAULT_TILE", "TILES", "kept_grad_applies", "tma_reads", "weight_grad_kept", "weight_grad_kept_reference"]


def _tile_name(cfg: dict[str, int | bool]) -> str:
    tma = "_tma" if cfg.get("TMA") else ""
    return f"{cfg['BLOCK_R']}x{cfg['BLOCK_C']}x{cfg['BLOCK_T']}_w{cfg['num_warps']}_s{cfg['num_stages']}{tma}"


# The tiles a plan chooses among, by name (plans store the name, so a reordered list cannot change what
# a stored plan runs): Triton's matmul tiles for Hopper, BLOCK_T the reduction step.
TILES: dict[str, dict[str, int | bool]] = {_tile_name(c): c for c in (
    {"BLOCK_R": 128, "BLOCK_C": 256, "BLOCK_T": 64, "GROUP_R": 8, "num_warps": 8, "num_stages": 3},
    {"BLOCK_R": 256, "BLOCK_C": 128, "BLOCK_T": 64, "GROUP_R": 8, "num_warps": 8, "num_stages": 3},
    {"BLOCK_R": 128, "BLOCK_C": 128, "BLOCK_T": 64, "GROUP_R": 8, "num_warps": 8, "num_stages": 4},
    {"BLOCK_R": 128, "BLOCK_C": 128, "BLOCK_T": 64, "GROUP_R": 8, "num_warps": 4, "num_stages": 4},
    {"BLOCK_R": 128, "BLOCK_C": 64, "BLOCK_T": 64, "GROUP_R": 8, "num_warps": 4, "num_stages": 4},
    {"BLOCK_R": 64, "BLOCK_C": 128, "BLOCK_T": 64, "GROUP_R": 8, "num_warps": 4, "num_stages": 4},
    {"BLOCK_R": 128, "BLOCK_C": 256, "BLOCK_T": 64, "GROUP_R": 8, "num_warps": 8, "num_stages": 3, "TMA": True},
    {"BLOCK_R": 128, "BLOCK_C": 256, "BLOCK_T": 64, "GROUP_R": 8, "num_warps": 8, "num_stages": 4, "TMA": True},
    {"BLOCK_R": 256, "BLOCK_C": 128, "BLOCK_T": 64, "GROUP_R": 8, "num_warps": 8, "num_stages": 3, "TMA": True},
    {"BLOCK_R": 128, "BLOCK_C": 128, "BLOCK_T": 64, "GROUP_R": 8, "num_warps": 8, "num_stages": 4, "TMA": True},
)}
DEFAULT_TILE = next(iter(TILES))
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kept_grad_kernel(
    dy, x, i_ptr, o_ptr, tokens, rows, cols,
    sdy0, sdy1, sx0, sx1, si0, si1, so0, so1,
    N: tl.constexpr, M: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr, EVEN_T: tl.constexpr,
    EVEN_RC: tl.constexpr, STEPS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, GROUP_R: tl.constexpr,
):
    # programs walk GROUP_R row tiles per column tile (L2 reuse of X's tiles), as Triton's matmul tutorial
    pid = tl.program_id(0)
    tiles_r = (rows + BLOCK_R - 1) // BLOCK_R
    tiles_c = (cols + BLOCK_C - 1) // BLOCK_C
    width = GROUP_R * tiles_c
    first_r = pid // width * GROUP_R
    size_r = tl.minimum(tiles_r - first_r, GROUP_R)
    pid_r = first_r + (pid % width) % size_r
    pid_c = (pid % width) // size_r

    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    t = tl.arange(0, BLOCK_T)
    if not TMA:  # dy and x are pointers (else tensor descriptors)
        dy_ptrs = dy + t[:, None] * sdy0 + r[None, :] * sdy1  # [BLOCK_T, BLOCK_R]: dY's rows are tokens
        x_ptrs = x + t[:, None] * sx0 + c[None, :] * sx1  # [BLOCK_T, BLOCK_C]
    acc = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)  # (tl.zeros is a @triton.jit function: see kernels._triton)
    # STEPS: the trip count as a constexpr for the interpreter (0 when compiled), which under numpy >= 2.4
    # cannot take a runtime one: it turns every assigned value and argument into a 1-element array
    for step in range(STEPS if STEPS else (tokens + BLOCK_T - 1) // BLOCK_T):
        # masks only where a tile passes an edge (2-D masks take registers the accumulator needs)
        if TMA:  # whole tiles, zeros past the edges
            a = dy.load([step * BLOCK_T, pid_r * BLOCK_R])
            b = x.load([step * BLOCK_T, pid_c * BLOCK_C])
        elif EVEN_T and EVEN_RC:
            a = tl.load(dy_ptrs)
            b = tl.load(x_ptrs)
        elif EVEN_RC:  # the last step's tokens past the end add zeros
            live = (step * BLOCK_T + t)[:, None] < tokens
            a = tl.load(dy_ptrs, mask=live, other=0.0)
            b = tl.load(x_ptrs, mask=live, other=0.0)
        else:
            live = (step * BLOCK_T + t)[:, None] < tokens
            a = tl.load(dy_ptrs, mask=live & (r[None, :] < rows), other=0.0)
            b = tl.load(x_ptrs, mask=live & (c[None, :] < cols), other=0.0)
        if IEEE:  # fp32 operands, or the interpreter (its tl.dot multiplies bf16 bit patterns as integers)
            acc = tl.dot(tl.trans(a.to(tl.float32)), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(a), b, acc)
        if not TMA:
            dy_ptrs += BLOCK_T * sdy0
            x_ptrs += BLOCK_T * sx0

    # epilogue: the kept entries of each group of M columns, picked from the accumulators
    G: tl.constexpr = BLOCK_C // M
    k = pid_c * (G * N) + tl.arange(0, G * N)  # kept-entry columns of this tile
    kept = (r[:, None] < rows) & (k[None, :] < cols // M * N)
    pos = tl.load(i_ptr + r[:, None] * si0 + k[None, :] * si1, mask=kept, other=0).to(tl.int32)
    # rounded first (the same values: rounding commutes with picking), so the re-layout moves half the bytes
    tile = tl.reshape(acc.to(o_ptr.dtype.element_ty), [BLOCK_R, G, M])
    picked = tl.gather(tile, tl.reshape(pos, [BLOCK_R, G, N]), 2)
    tl.store(o_ptr + r[:, None] * so0 + k[None, :] * so1, tl.reshape(picked, [BLOCK_R, G * N]), mask=kept)


_KERNEL = DualKernel(_kept_grad_kernel)


def weight_grad_kept_reference(dy: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Pure torch: ``dyᵀ @ x`` in fp32, at the kept positions ``idx``, rounded to ``dy``'s dtype."""
    return gather_kept_reference(dy.float().t() @ x.float(), idx, n, m).to(dy.dtype)


def kept_grad_applies(n: int, m: int, config: dict[str, int]) -> bool:
    """Whether the kernel takes the pattern N:M with tile ``config`` (N and M powers of two, M dividing
    the tile's columns: the epilogue reshapes the tile into groups)."""
    return n & (n - 1) == 0 and m & (m - 1) == 0 and 0 < n < m and config["BLOCK_C"] % m == 0


def tma_reads(dy: torch.Tensor, x: torch.Tensor, interpreted: bool = False) -> bool:
    """Whether the TMA tiles can read ``dy`` and ``x``: rows contiguous, row strides and bases 16-byte
    aligned, on a GPU with the tensor memory accelerator (Hopper and newer) or through the interpreter."""
    aligned = all(t.stride(1) == 1 and t.stride(0) * t.element_size() % 16 == 0 and t.data_ptr() % 16 == 0
                  for t in (dy, x))
    return aligned and (interpreted or _has_tma(dy.device.index if dy.device.index is not None
                                                 else torch.cuda.current_device()))


@functools.cache
def _has_tma(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def weight_grad_kept(dy: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, n: int, m: int, *,
                     config: dict[str, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(dyᵀ @ x)`` at the N:M positions ``idx``: the weight gradient of ``y = x Wᵀ`` at ``W``'s kept entries.

    ``dy`` ``(tokens, out)`` and ``x`` ``(tokens, in)`` of one dtype (fp16/bf16 on tensor cores
    with fp32 sums; fp32 in full fp32), any strides; ``idx`` uint8 ``(out, in*n/m)`` (sorted
    positions within each group, as ``dsparse.nm.kept_positions``). Returns ``(out, in*n/m)`` in
    ``dy``'s dtype (``out=``: written there). Equal to :func:`weight_grad_kept_reference` up to the
    order of the fp32 sums. ``config``: one of :data:`TILES` (:data:`DEFAULT_TILE` by default; plans choose);
    a ``"TMA"`` tile reads with pointer loads instead where :func:`tma_reads` says the tensors or the
    GPU do not allow TMA (the same result). CPU tensors run through the Triton interpreter (slow: for
    tests).
    """
    what = "weight_grad_kept"
    check_2d(what, "dy", dy, dtypes=_DTYPES)
    check_2d(what, "x", x, dtypes=(dy.dtype,))
    (tokens, rows), cols = dy.shape, x.shape[1]
    if x.shape[0] != tokens:
        raise ValueError(f"{what}: dy has {tokens} tokens (rows) but x has {x.shape[0]}")
    cfg = dict(config or TILES[DEFAULT_TILE])
    if not kept_grad_applies(n, m, cfg) or cols % m:
        raise ValueError(f"{what}: {n}:{m} on {cols} input columns with BLOCK_C = {cfg['BLOCK_C']} is not supported: "
                         "N and M must be powers of two (0 < N < M), M must divide the columns and BLOCK_C; "
                         "use the dense product and kernels.gather_kept instead")
    out = kept_output(what, dy, idx, out, rows, cols // m * n, x=x)
    if out.numel() == 0:
        return out
    if tokens == 0:
        return out.zero_()
    interpreted = _KERNEL.is_interpreted(dy.device)
    ieee = dy.dtype == torch.float32 or interpreted
    a, b = dy, x
    tma = cfg.pop("TMA", False) and tma_reads(dy, x, interpreted)
    if tma:
        a = TensorDescriptor.from_tensor(dy, [cfg["BLOCK_T"], cfg["BLOCK_R"]])
        b = TensorDescriptor.from_tensor(x, [cfg["BLOCK_T"], cfg["BLOCK_C"]])
    grid = (cdiv(rows, cfg["BLOCK_R"]) * cdiv(cols, cfg["BLOCK_C"]),)
    _KERNEL.launch(dy.device, grid, a, b, idx, out, tokens, rows, cols, dy.stride(0), dy.stride(1),
                   x.stride(0), x.stride(1), idx.stride(0), idx.stride(1), out.stride(0), out.stride(1),
                   N=n, M=m, IEEE=ieee, TMA=tma, EVEN_T=tokens % cfg["BLOCK_T"] == 0,
                   EVEN_RC=rows % cfg["BLOCK_R"] == 0 and cols % cfg["BLOCK_C"] == 0,
                   STEPS=cdiv(tokens, cfg["BLOCK_T"]) if interpreted else 0, **cfg)
    return out
