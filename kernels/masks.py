"""W̃ᵀ's mask and slots from W's kept values (2:4), in one pass: the mask-change computation.

Equal, bit for bit and tie for tie, to ``dsparse.nm.transpose_keep`` followed by
``dsparse.backends.cusparselt.transpose_slots``:

* ``keep_t``: in every 4x4 block (4 out-rows x one in-group of 4 columns), for each
  in-column, the 2 entries of largest ``|value|`` along ``out`` among those ``W`` keeps
  (entries ``W`` prunes are never chosen; equal magnitudes go to the lower out-row, as the
  reference's stable sort does, NaN counting as the largest magnitude).
* ``slots_t``: per in-column and group of 4 along ``out``, the 2 positions cuSPARSELt's
  metadata names, ascending: scored 2 (in W̃ᵀ), 1 (kept by ``W`` only), 0 (pruned), the 2
  best taken with ties to the lower position.

Tiling: a program owns ``BLOCK_H x BLOCK_G`` whole 4x4 blocks; it reads the 4 out-rows'
values and positions once, ranks each column's 4 entries with 12 comparisons, writes
``keep_t`` for those rows, packs the block's 8 slots (2 bits each) into one int32,
transposes that once and writes ``slots_t`` rows ``4g .. 4g + 3``.
"""
from __future__ import annotations

import torch
import triton.language as tl

from ._triton import DualKernel, cdiv, check_2d, check_same_device

__all__ = ["transpose_keep_and_slots", "transpose_keep_and_slots_reference", "slots_reference", "VALUE_DTYPES"]

VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CONFIG = {"BLOCK_H": 16, "BLOCK_G": 16, "num_warps": 4}

_NAN_KEY = tl.constexpr(0x7F800001)  # every NaN's key: above +inf's bits (0x7F800000), all NaNs equal


def _transpose_keep_and_slots_kernel(
    v_ptr, i_ptr, k_ptr, s_ptr,
    n_h, n_g,  # out // 4, in // 4
    sv0, sv1, si0, si1, sk0, sk1, ss0, ss1,
    BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr,
):
    h0 = tl.program_id(0) * BLOCK_H
    g0 = tl.program_id(1) * BLOCK_G

    # ---- W's side: rows 4h + r, kept columns 2g + k; contiguous row segments split into k = 0, 1
    hw = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)[:, None]  # int64: row offsets may pass 2**31
    cw = (2 * g0 + tl.arange(0, 2 * BLOCK_G))[None, :]
    mw = (hw < n_h) & (cw < 2 * n_g)
    # key: |value|'s float32 bits (monotone for non-negative floats), every NaN above +inf
    v = tl.load(v_ptr + (4 * hw + 0) * sv0 + cw * sv1, mask=mw, other=0)
    key = tl.minimum(tl.abs(v.to(tl.float32)).to(tl.int32, bitcast=True), _NAN_KEY)
    key00, key01 = tl.split(tl.reshape(key, [BLOCK_H, BLOCK_G, 2]))
    v = tl.load(v_ptr + (4 * hw + 1) * sv0 + cw * sv1, mask=mw, other=0)
    key = tl.minimum(tl.abs(v.to(tl.float32)).to(tl.int32, bitcast=True), _NAN_KEY)
    key10, key11 = tl.split(tl.reshape(key, [BLOCK_H, BLOCK_G, 2]))
    v = tl.load(v_ptr + (4 * hw + 2) * sv0 + cw * sv1, mask=mw, other=0)
    key = tl.minimum(tl.abs(v.to(tl.float32)).to(tl.int32, bitcast=True), _NAN_KEY)
    key20, key21 = tl.split(tl.reshape(key, [BLOCK_H, BLOCK_G, 2]))
    v = tl.load(v_ptr + (4 * hw + 3) * sv0 + cw * sv1, mask=mw, other=0)
    key = tl.minimum(tl.abs(v.to(tl.float32)).to(tl.int32, bitcast=True), _NAN_KEY)
    key30, key31 = tl.split(tl.reshape(key, [BLOCK_H, BLOCK_G, 2]))
    p = tl.load(i_ptr + (4 * hw + 0) * si0 + cw * si1, mask=mw, other=0).to(tl.int32)
    pos00, pos01 = tl.split(tl.reshape(p, [BLOCK_H, BLOCK_G, 2]))
    p = tl.load(i_ptr + (4 * hw + 1) * si0 + cw * si1, mask=mw, other=0).to(tl.int32)
    pos10, pos11 = tl.split(tl.reshape(p, [BLOCK_H, BLOCK_G, 2]))
    p = tl.load(i_ptr + (4 * hw + 2) * si0 + cw * si1, mask=mw, other=0).to(tl.int32)
    pos20, pos21 = tl.split(tl.reshape(p, [BLOCK_H, BLOCK_G, 2]))
    p = tl.load(i_ptr + (4 * hw + 3) * si0 + cw * si1, mask=mw, other=0).to(tl.int32)
    pos30, pos31 = tl.split(tl.reshape(p, [BLOCK_H, BLOCK_G, 2]))

    zero = tl.full([BLOCK_H, BLOCK_G], 0, dtype=tl.int32)
    keep00 = zero
    keep01 = zero
    keep10 = zero
    keep11 = zero
    keep20 = zero
    keep21 = zero
    keep30 = zero
    keep31 = zero
    scode = zero  # 4 bits per column c: slot0 | slot1 << 2
    for c in tl.static_range(4):
        # column c's 4 entries along out: key if W keeps it, -1 if pruned
        s0 = tl.where(pos00 == c, key00, tl.where(pos01 == c, key01, -1))
        s1 = tl.where(pos10 == c, key10, tl.where(pos11 == c, key11, -1))
        s2 = tl.where(pos20 == c, key20, tl.where(pos21 == c, key21, -1))
        s3 = tl.where(pos30 == c, key30, tl.where(pos31 == c, key31, -1))
        # stable descending rank: entries above, plus equal ones at a lower row
        rank0 = (s1 > s0).to(tl.int32) + (s2 > s0).to(tl.int32) + (s3 > s0).to(tl.int32)
        rank1 = (s0 >= s1).to(tl.int32) + (s2 > s1).to(tl.int32) + (s3 > s1).to(tl.int32)
        rank2 = (s0 >= s2).to(tl.int32) + (s1 >= s2).to(tl.int32) + (s3 > s2).to(tl.int32)
        rank3 = (s0 >= s3).to(tl.int32) + (s1 >= s3).to(tl.int32) + (s2 >= s3).to(tl.int32)
        ch0 = (rank0 < 2) & (s0 >= 0)
        ch1 = (rank1 < 2) & (s1 >= 0)
        ch2 = (rank2 < 2) & (s2 >= 0)
        ch3 = (rank3 < 2) & (s3 >= 0)
        keep00 = keep00 | ((pos00 == c) & ch0).to(tl.int32)
        keep01 = keep01 | ((pos01 == c) & ch0).to(tl.int32)
        keep10 = keep10 | ((pos10 == c) & ch1).to(tl.int32)
        keep11 = keep11 | ((pos11 == c) & ch1).to(tl.int32)
        keep20 = keep20 | ((pos20 == c) & ch2).to(tl.int32)
        keep21 = keep21 | ((pos21 == c) & ch2).to(tl.int32)
        keep30 = keep30 | ((pos30 == c) & ch3).to(tl.int32)
        keep31 = keep31 | ((pos31 == c) & ch3).to(tl.int32)
        # slots: score 2 (in W̃ᵀ) / 1 (kept by W only) / 0 (pruned), ties to the lower row;
        # t = 4 * score + 3 - r is distinct per row, so "2 best" is "fewer than 2 above"
        t0 = tl.where(ch0, 8, tl.where(s0 >= 0, 4, 0)) + 3
        t1 = tl.where(ch1, 8, tl.where(s1 >= 0, 4, 0)) + 2
        t2 = tl.where(ch2, 8, tl.where(s2 >= 0, 4, 0)) + 1
        t3 = tl.where(ch3, 8, tl.where(s3 >= 0, 4, 0))
        sel0 = ((t1 > t0).to(tl.int32) + (t2 > t0).to(tl.int32) + (t3 > t0).to(tl.int32)) < 2
        sel1 = ((t0 > t1).to(tl.int32) + (t2 > t1).to(tl.int32) + (t3 > t1).to(tl.int32)) < 2
        sel2 = ((t0 > t2).to(tl.int32) + (t1 > t2).to(tl.int32) + (t3 > t2).to(tl.int32)) < 2
        sel3 = ((t0 > t3).to(tl.int32) + (t1 > t3).to(tl.int32) + (t2 > t3).to(tl.int32)) < 2
        slot_lo = tl.where(sel0, 0, tl.where(sel1, 1, 2))
        slot_hi = tl.where(sel3, 3, tl.where(sel2, 2, 1))
        scode = scode | ((slot_lo | (slot_hi << 2)) << (4 * c))

    kp = tl.reshape(tl.join(keep00, keep01), [BLOCK_H, 2 * BLOCK_G]).to(tl.uint8)
    tl.store(k_ptr + (4 * hw + 0) * sk0 + cw * sk1, kp, mask=mw)
    kp = tl.reshape(tl.join(keep10, keep11), [BLOCK_H, 2 * BLOCK_G]).to(tl.uint8)
    tl.store(k_ptr + (4 * hw + 1) * sk0 + cw * sk1, kp, mask=mw)
    kp = tl.reshape(tl.join(keep20, keep21), [BLOCK_H, 2 * BLOCK_G]).to(tl.uint8)
    tl.store(k_ptr + (4 * hw + 2) * sk0 + cw * sk1, kp, mask=mw)
    kp = tl.reshape(tl.join(keep30, keep31), [BLOCK_H, 2 * BLOCK_G]).to(tl.uint8)
    tl.store(k_ptr + (4 * hw + 3) * sk0 + cw * sk1, kp, mask=mw)

    # ---- W̃ᵀ's side: rows 4g + c, columns 2h + j of slots_t
    scode = tl.trans(scode)  # [BLOCK_G, BLOCK_H]
    gt = (g0 + tl.arange(0, BLOCK_G)).to(tl.int64)[:, None]
    ct = (2 * h0 + tl.arange(0, 2 * BLOCK_H))[None, :]
    mt = (gt < n_g) & (ct < 2 * n_h)
    for c in tl.static_range(4):
        lo = (scode >> (4 * c)) & 3
        hi = (scode >> (4 * c + 2)) & 3
        sl = tl.reshape(tl.join(lo, hi), [BLOCK_G, 2 * BLOCK_H]).to(tl.uint8)
        tl.store(s_ptr + (4 * gt + c) * ss0 + ct * ss1, sl, mask=mt)


_KERNEL = DualKernel(_transpose_keep_and_slots_kernel)


def _nm_mask_2_4(scores: torch.Tensor) -> torch.Tensor:
    """Top 2 of every 4 along the last dim, stable (ties to the lower position)."""
    groups = scores.reshape(*scores.shape[:-1], -1, 4)
    top = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :2]
    return torch.zeros(groups.shape, dtype=torch.bool, device=scores.device).scatter_(-1, top, True)


def transpose_keep_and_slots_reference(values: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch ``(keep_t, slots_t)``: ``dsparse.nm.transpose_keep`` then ``cusparselt.transpose_slots``."""
    rows, kept = values.shape
    in_features = kept * 2
    pos = idx.long().reshape(rows, kept // 2, 2)
    # keep_t: (M⊙W)ᵀ pruned 2:4 along out, pruned entries scored -1
    scores = torch.full((rows, kept // 2, 4), -1.0, dtype=torch.float32, device=values.device)
    scores.scatter_(-1, pos, values.detach().abs().float().reshape(rows, kept // 2, 2))
    mask_t = _nm_mask_2_4(scores.reshape(rows, in_features).t())  # (in, out/4, 4)
    mask = mask_t.reshape(in_features, rows).t().reshape(rows, kept // 2, 4)
    keep_t = torch.gather(mask, -1, pos).reshape(rows, kept)
    return keep_t, slots_reference(idx, keep_t)


def slots_reference(idx: torch.Tensor, keep_t: torch.Tensor) -> torch.Tensor:
    """Pure-torch ``slots_t`` ``(in, out/2)``: per in-column and group of 4 along out, the 2 positions
    scored best (2: W̃ᵀ keeps it, 1: kept by W only, 0: pruned; ties to the lower position), ascending."""
    rows, kept = idx.shape
    in_features = kept * 2
    score = torch.zeros(rows, kept // 2, 4, dtype=torch.uint8, device=idx.device)
    score.scatter_(-1, idx.long().reshape(rows, kept // 2, 2), (keep_t.to(torch.uint8) + 1).reshape(rows, kept // 2, 2))
    chosen = _nm_mask_2_4(score.reshape(rows, in_features).t().contiguous())  # (in, out/4, 4)
    order = torch.sort((~chosen).to(torch.uint8), dim=-1, stable=True).indices[..., :2]
    return order.to(torch.uint8).reshape(in_features, rows // 2)


def transpose_keep_and_slots(values: torch.Tensor, idx: torch.Tensor, *,
                             config: dict[str, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep_t, slots_t)`` of the double-pruned transpose of a 2:4 weight, in one pass.

    ``values`` ``(out, in/2)`` (fp16/bf16/fp32) and ``idx`` (uint8 positions 0..3, distinct
    within each group) describe ``W`` as in :mod:`dsparse.nm`. Returns ``keep_t`` (bool,
    ``(out, in/2)``: which kept values W̃ᵀ keeps) and ``slots_t`` (uint8, ``(in, out/2)``:
    W̃ᵀ's 2 metadata slots per group of 4 along ``out``, ascending). Bit-identical to
    :func:`transpose_keep_and_slots_reference` (= ``nm.transpose_keep`` +
    ``cusparselt.transpose_slots``), ties and zeros included. CPU tensors run through
    the Triton interpreter (slow: for tests). ``config`` overrides :data:`CONFIG`.
    """
    what = "transpose_keep_and_slots"
    check_2d(what, "values", values, dtypes=VALUE_DTYPES)
    rows, kept = values.shape
    if rows % 4:
        raise ValueError(f"{what}: out_features = {rows} must be a multiple of 4 (2:4 groups along out)")
    if kept % 2:
        raise ValueError(f"{what}: values has {kept} columns; 2:4 kept values need an even count (in/2)")
    in_features = kept * 2
    check_2d(what, "idx", idx, shape=(rows, kept), dtypes=(torch.uint8,))
    check_same_device(what, values, idx=idx)
    keep_t = torch.empty(rows, kept, dtype=torch.bool, device=values.device)
    slots_t = torch.empty(in_features, rows // 2, dtype=torch.uint8, device=values.device)
    if values.numel() == 0:
        return keep_t, slots_t
    keep_u8 = keep_t.view(torch.uint8)
    cfg = {**CONFIG, **(config or {})}
    grid = (cdiv(rows // 4, cfg["BLOCK_H"]), cdiv(in_features // 4, cfg["BLOCK_G"]))
    _KERNEL.launch(values.device, grid,
                   values, idx, keep_u8, slots_t, rows // 4, in_features // 4,
                   values.stride(0), values.stride(1), idx.stride(0), idx.stride(1),
                   keep_u8.stride(0), keep_u8.stride(1), slots_t.stride(0), slots_t.stride(1),
                   **cfg)
    return keep_t, slots_t
