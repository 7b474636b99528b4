"""A product with few tokens on a compressed 2:4 operand: ``x @ Aᵀ (+ bias)``, reading cuSPARSELt's
compressed ``A`` (:mod:`kernels.cslt_meta`'s layout) as it is.

Decoding runs every sparse product on a handful of tokens (one per sequence). Such a
product is bound by reading the operand: the dense weight is 2 bytes an entry, the
compressed one 9/16 of that (the kept half of the values, plus a nibble of metadata per
group of 4). cuSPARSELt's kernels are tiled for many tokens; this one is tiled for few.
Each program takes ``BLOCK_R`` rows of ``A`` and up to ``BLOCK_T`` tokens, walks ``k`` in
chunks of ``BLOCK_K``, rebuilds each chunk's dense tile in registers from the kept values
and their positions, and multiplies it on tensor cores (fp32 accumulation; the bias is
added in fp32 and the result rounded once, as cuSPARSELt does). The metadata is read as
whole 8-byte words (a row's nibbles for 8 groups), so every load in the loop is a
contiguous run that Triton pipelines (``cp.async``), none a byte gather. The per-shape plans
(:mod:`dsparse.backends.plans`) choose it over cuSPARSELt's algorithms where it measures
faster; it needs no other operand, so a frozen inference model, which keeps only the
compressed one, can take it too.

A program walks its chunks one after another, and one row block per program can leave most
SMs with one or two programs. So the kernel splits ``k`` (``SPLIT_K`` programs per tile, by
default as many as fill :data:`PROGRAMS_PER_SM` programs per SM): each writes its fp32 partial
sums, takes a ticket from the tile's counter, and the last to arrive adds the partials in
split order (so the result does not depend on arrival order: deterministic), adds the bias,
rounds once and resets the counter. One launch, no zeroed buffer; the counters live per
device and stream. On the H200 (``kernels_h200_skinny*.json``) splitting took llama-1b's
decoding products from 15-48 to 12-45 µs with 16-row tiles, 64-row tiles to 11-31 µs; dense
cuBLAS takes 6-10. What bounds the kernel then is rebuilding the dense tile (selects and
layout shuffles per weight entry), not memory: 0.4-0.8 TB/s of the operand.
"""
from __future__ import annotations

import torch
import triton.language as tl

from . import cslt_meta
from ._triton import DualKernel, cdiv, check_2d, check_same_device, next_power_of_2

__all__ = ["skinny_sparse_mm", "skinny_sparse_mm_reference", "split_k", "MAX_TOKENS"]

MAX_TOKENS = 64  # tuning offers this kernel up to here (it runs any count, one token tile at a time)
PROGRAMS_PER_SM = 4  # the default split of k fills this many programs per SM
# fastest at each of llama-1b's decoding products on the H200 (kernels_h200_skinny.json); SPLIT_K 0: by occupancy
CONFIG = {"BLOCK_R": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3, "SPLIT_K": 0}
_DTYPES = (torch.float16, torch.bfloat16)


def _skinny_kernel(packed_ptr, x_ptr, bias_ptr, y_ptr, part_ptr, ticket_ptr, T, R, K, sx, sy,
                   HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, K_CHUNKS: tl.constexpr, SPLIT_K: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # R * K may pass 2**31
    toks = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    mt = toks < T
    mr = rows < R
    # kernels.cslt_meta's layout: a row's nibbles for 8 groups (8g' .. 8g'+7) fill one 8-byte word, the
    # groups at bytes (g % 4) * 2 + g // 4 % 2, rows r and r + 8 in the low and high nibbles; the word of
    # (row r, groups 8g' ..) is int64 number (r // 64) * K + (r // 16 % 4) * 8 + r % 8 + 32 g'
    word_r = (rows // 64) * K + (rows // 16 % 4) * 8 + rows % 8
    meta_ptr = (packed_ptr + R * (K // 2)).to(tl.pointer_type(tl.int64))  # after the kept values
    j = tl.arange(0, 8)  # group 8g' + j
    shift = ((j % 4) * 2 + j // 4)[None, None, :] * 8 + ((rows // 8 % 2) * 4)[:, None, None]
    c4 = tl.arange(0, 4)
    acc = tl.full([BLOCK_R, BLOCK_T], 0.0, dtype=tl.float32)  # not tl.zeros: a @triton.jit function
    for c in range(K_CHUNKS):  # constexpr trip count (runtime bounds trip up the interpreter)
        chunk = tl.program_id(2) * K_CHUNKS + c  # this split's chunks (past k: masked)
        kept = chunk * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        v = tl.load(packed_ptr + rows[:, None] * (K // 2) + kept[None, :],
                    mask=mr[:, None] & (kept < K // 2)[None, :], other=0)
        v0, v1 = tl.split(tl.reshape(v, [BLOCK_R, BLOCK_K // 4, 2]))
        blocks = chunk * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)  # the chunk's blocks of 8 groups
        words = tl.load(meta_ptr + word_r[:, None] + blocks[None, :] * 32,
                        mask=mr[:, None] & (blocks < K // 32)[None, :], other=0)
        pos = tl.reshape((words[:, :, None] >> shift) & 15, [BLOCK_R, BLOCK_K // 4])  # (row, group) nibbles
        p0 = (pos & 3)[:, :, None]
        p1 = (pos >> 2)[:, :, None]
        w = tl.where(c4[None, None, :] == p0, v0[:, :, None], tl.where(c4[None, None, :] == p1, v1[:, :, None], 0))
        w = tl.reshape(w, [BLOCK_R, BLOCK_K])  # columns 4g .. 4g+3 of each group in order
        cols = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + toks[:, None] * sx + cols[None, :], mask=mt[:, None] & (cols < K)[None, :], other=0)
        if IEEE:  # the interpreter's tl.dot multiplies bf16 bit patterns as integers: the same math in fp32
            acc = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), acc, input_precision="ieee")
        else:  # fp16 x fp16 or bf16 x bf16 on tensor cores: exact products, fp32 sums
            acc = tl.dot(w, tl.trans(x), acc)
    out_mask = mr[:, None] & mt[None, :]
    last = True
    if SPLIT_K > 1:  # partial sums out; the tile's last split adds them up in split order
        part = part_ptr + toks[None, :] * R + rows[:, None]  # partial s at part + s * T * R
        tl.store(part + tl.program_id(2) * T * R, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is written before the ticket releases them
        ticket = ticket_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        last = tl.atomic_add(ticket, 1, sem="acq_rel") == SPLIT_K - 1
        if last:
            acc = tl.full([BLOCK_R, BLOCK_T], 0.0, dtype=tl.float32)
            for s in range(SPLIT_K):
                acc += tl.load(part + s * T * R, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(ticket, 0)  # ready for the next launch on this stream
    if last:
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + rows, mask=mr, other=0).to(tl.float32)[:, None]
        tl.store(y_ptr + toks[None, :] * sy + rows[:, None], acc.to(y_ptr.dtype.element_ty), mask=out_mask)


_KERNEL = DualKernel(_skinny_kernel)
_TICKETS: dict[tuple, torch.Tensor] = {}  # (device, stream) -> per-tile counters, zero between launches
_SMS: dict[torch.device, int] = {}


def _tickets(device: torch.device, tiles: int) -> torch.Tensor:
    """The split-k counters of launches on ``device``'s current stream (kernels on one stream run in order,
    and each leaves its counters at zero; another stream gets its own)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    tickets = _TICKETS.get((device, stream))
    if tickets is None or tickets.numel() < tiles:
        tickets = _TICKETS[(device, stream)] = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
    return tickets


def split_k(tiles: int, chunks: int, device: torch.device) -> int:
    """How many programs share a tile's ``chunks`` of ``k``: enough for :data:`PROGRAMS_PER_SM` programs per
    SM (the interpreter: 1), then as few as give each split the same chunk count."""
    if device.type != "cuda":
        return 1
    sms = _SMS.get(device)
    if sms is None:
        sms = _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, min(chunks, PROGRAMS_PER_SM * sms // tiles))
    return cdiv(chunks, cdiv(chunks, want))


def _check(packed: torch.Tensor, x2d: torch.Tensor, bias: torch.Tensor | None) -> None:
    what = "skinny_sparse_mm"
    check_2d(what, "x2d", x2d, dtypes=_DTYPES)
    check_2d(what, "packed", packed, dtypes=(x2d.dtype,))
    rows, cols = packed.shape[0], x2d.shape[1]
    cslt_meta.check_shape(what, rows, cols)
    if packed.shape[1] != cols // 2 + cols // 16 or not packed.is_contiguous():
        raise ValueError(f"{what}: packed must be the contiguous compressed form of a ({rows}, {cols}) operand, "
                         f"shape ({rows}, {cols // 2 + cols // 16}); got {tuple(packed.shape)} "
                         f"(x2d has {cols} columns: the operand's)")
    if x2d.stride(1) != 1:
        raise ValueError(f"{what}: x2d's rows must be contiguous runs (call .contiguous() first)")
    if bias is not None and (bias.shape != (rows,) or bias.dtype != x2d.dtype or not bias.is_contiguous()):
        raise ValueError(f"{what}: bias must be a contiguous ({rows},) tensor of x2d's dtype {x2d.dtype}")
    check_same_device(what, x2d, packed=packed, bias=bias)


def skinny_sparse_mm(packed: torch.Tensor, x2d: torch.Tensor, bias: torch.Tensor | None = None, *,
                     config: dict[str, int] | None = None, validate: bool = True) -> torch.Tensor:
    """``x2d @ Aᵀ (+ bias)`` ``(tokens, rows)`` for ``packed``, the compressed ``A`` ``(rows, cols)`` 2:4 along
    ``cols`` as ``torch._cslt_compress`` writes it (:mod:`kernels.cslt_meta`: both dims multiples of 64).

    ``x2d`` ``(tokens, cols)`` fp16/bf16 with unit column stride; ``bias`` ``(rows,)`` of its dtype.
    Any token count runs; the kernel is built for few (up to :data:`MAX_TOKENS`). CPU tensors
    run through the Triton interpreter (tests: bf16 products in fp32 there, the rounding
    truncates). ``config`` overrides :data:`CONFIG`. ``validate=False`` skips the checks of the
    operands for callers that guarantee them (the backend's decoding path, where each check is
    host time).
    """
    if validate:
        _check(packed, x2d, bias)
    tokens, cols = x2d.shape
    rows = packed.shape[0]
    y = torch.empty(tokens, rows, dtype=x2d.dtype, device=x2d.device)
    if tokens == 0:
        return y
    cfg = CONFIG
    if config is not None:
        cfg = {**CONFIG, **config}
        if cfg["BLOCK_K"] % 32 or cfg["BLOCK_R"] < 16 or cfg["SPLIT_K"] < 0:
            raise ValueError(f"skinny_sparse_mm: config needs BLOCK_K a multiple of 32 (whole metadata words), "
                             f"BLOCK_R >= 16 (tensor-core tiles) and SPLIT_K >= 0 (0: by occupancy), got {cfg}")
    block_t = min(MAX_TOKENS, max(16, next_power_of_2(tokens)))
    grid = (cdiv(rows, cfg["BLOCK_R"]), cdiv(tokens, block_t))
    chunks = cdiv(cols, cfg["BLOCK_K"])
    splits = min(chunks, cfg["SPLIT_K"] or split_k(grid[0] * grid[1], chunks, x2d.device))
    per_split = cdiv(chunks, splits)
    splits = cdiv(chunks, per_split)  # none left empty
    if splits > 1:
        part = torch.empty(splits, tokens, rows, dtype=torch.float32, device=x2d.device)
        tickets = _tickets(x2d.device, grid[0] * grid[1])
    else:
        part = tickets = y  # not read
    ieee = x2d.dtype == torch.bfloat16 and _KERNEL.is_interpreted(x2d.device)
    _KERNEL.launch(x2d.device, (*grid, splits), packed, x2d, bias if bias is not None else x2d, y, part, tickets,
                   tokens, rows, cols, x2d.stride(0), y.stride(0), HAS_BIAS=bias is not None, IEEE=ieee,
                   K_CHUNKS=per_split, SPLIT_K=splits, BLOCK_T=block_t, BLOCK_R=cfg["BLOCK_R"],
                   BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


def skinny_sparse_mm_reference(packed: torch.Tensor, x2d: torch.Tensor, bias: torch.Tensor | None = None
                               ) -> torch.Tensor:
    """Pure-torch :func:`skinny_sparse_mm`: the operand decompressed, the product and bias in fp32, rounded once."""
    _check(packed, x2d, bias)
    y = x2d.float() @ cslt_meta.decompress_reference(packed, x2d.shape[1]).float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x2d.dtype)
