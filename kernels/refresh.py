"""Values of the double-pruned transpose W̃ᵀ (2:4), in one pass: the per-step refresh.

After every optimizer step the compressed W̃ᵀ operand gets new values (its mask, and so its
metadata slots, stays). This kernel reads ``values``/``idx``/``keep_t`` of ``W`` once and
writes W̃ᵀ's kept values, optionally straight into the values region of the compressed
operand (``out=``), and optionally copies ``values`` into W's own compressed operand in
the same pass (``values_out=``): the whole cuSPARSELt refresh in one kernel.

Tiling: a program owns ``BLOCK_H x BLOCK_G`` whole 4x4 blocks (4 out-rows x one in-group
of 4 columns). It loads the kept values, positions and ``keep_t`` of its ``4*BLOCK_H``
out-rows (``2*BLOCK_G`` kept values each), packs the 8 effective positions per block
(3 bits: position and ``keep_t``) into one int32, transposes values and codes in
registers/shared memory (``tl.trans``), and for each of its ``4*BLOCK_G`` in-rows ranks the
4 out-rows of every group as cuSPARSELt's metadata slots were chosen (W̃ᵀ keeps it > W
keeps it > pruned, ties to the lower row) and writes the values at the 2 slots. Deriving
the slots costs a few integer compares and saves storing them (0.5 byte per weight).
"""
from __future__ import annotations

import torch
import triton.language as tl

from ._triton import DualKernel, cdiv, check_2d, check_same_device
from .masks import slots_reference

__all__ = ["transpose_values", "transpose_values_reference", "VALUE_DTYPES"]

VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# 4x4 blocks per program along out (BLOCK_H) and along in (BLOCK_G), powers of two
CONFIG = {"BLOCK_H": 16, "BLOCK_G": 16, "num_warps": 4}  # best or level on the H100 and H200 (kernels_h200_llama1b.json)


def _transpose_values_kernel(
    v_ptr, i_ptr, k_ptr, o_ptr, c_ptr,
    n_h, n_g,  # out // 4, in // 4
    sv0, sv1, si0, si1, sk0, sk1, so0, so1, sc0, sc1,
    HAS_COPY: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr,
):
    h0 = tl.program_id(0) * BLOCK_H
    g0 = tl.program_id(1) * BLOCK_G

    # ---- W's side: rows 4h + r, kept columns 2g + k, loaded as contiguous row segments
    # [BLOCK_H, 2*BLOCK_G] and split into k = 0, 1 ([BLOCK_H, BLOCK_G] each).
    hw = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)[:, None]  # int64: row offsets may pass 2**31
    cw = (2 * g0 + tl.arange(0, 2 * BLOCK_G))[None, :]
    mw = (hw < n_h) & (cw < 2 * n_g)
    v0 = tl.load(v_ptr + (4 * hw + 0) * sv0 + cw * sv1, mask=mw, other=0)
    v1 = tl.load(v_ptr + (4 * hw + 1) * sv0 + cw * sv1, mask=mw, other=0)
    v2 = tl.load(v_ptr + (4 * hw + 2) * sv0 + cw * sv1, mask=mw, other=0)
    v3 = tl.load(v_ptr + (4 * hw + 3) * sv0 + cw * sv1, mask=mw, other=0)
    if HAS_COPY:  # W's own compressed values, from the same registers
        tl.store(c_ptr + (4 * hw + 0) * sc0 + cw * sc1, v0, mask=mw)
        tl.store(c_ptr + (4 * hw + 1) * sc0 + cw * sc1, v1, mask=mw)
        tl.store(c_ptr + (4 * hw + 2) * sc0 + cw * sc1, v2, mask=mw)
        tl.store(c_ptr + (4 * hw + 3) * sc0 + cw * sc1, v3, mask=mw)
    # every kept value's position (bits 0-1) and whether W̃ᵀ keeps it (bit 2), 3 bits each,
    # 8 per 4x4 block in one int32
    code = tl.full([BLOCK_H, BLOCK_G], 0, dtype=tl.int32)
    for r in tl.static_range(4):
        pos = tl.load(i_ptr + (4 * hw + r) * si0 + cw * si1, mask=mw, other=0).to(tl.int32)
        keep = tl.load(k_ptr + (4 * hw + r) * sk0 + cw * sk1, mask=mw, other=0)
        enc = (pos & 3) | tl.where(keep != 0, 4, 0)
        enc0, enc1 = tl.split(tl.reshape(enc, [BLOCK_H, BLOCK_G, 2]))
        code = code | (enc0 << (6 * r)) | (enc1 << (6 * r + 3))

    # ---- to W̃ᵀ's side, [BLOCK_G, BLOCK_H] (Triton places the layout conversions, through shared memory)
    code = tl.trans(code)
    v00, v01 = tl.split(tl.reshape(v0, [BLOCK_H, BLOCK_G, 2]))
    v10, v11 = tl.split(tl.reshape(v1, [BLOCK_H, BLOCK_G, 2]))
    v20, v21 = tl.split(tl.reshape(v2, [BLOCK_H, BLOCK_G, 2]))
    v30, v31 = tl.split(tl.reshape(v3, [BLOCK_H, BLOCK_G, 2]))
    v00 = tl.trans(v00)
    v01 = tl.trans(v01)
    v10 = tl.trans(v10)
    v11 = tl.trans(v11)
    v20 = tl.trans(v20)
    v21 = tl.trans(v21)
    v30 = tl.trans(v30)
    v31 = tl.trans(v31)
    zero = tl.full([BLOCK_G, BLOCK_H], 0, dtype=v00.dtype)

    # ---- W̃ᵀ's rows 4g + c, columns 2h + j: contiguous row segments [BLOCK_G, 2*BLOCK_H]
    gt = (g0 + tl.arange(0, BLOCK_G)).to(tl.int64)[:, None]
    ct = (2 * h0 + tl.arange(0, 2 * BLOCK_H))[None, :]
    mt = (gt < n_g) & (ct < 2 * n_h)
    for c in tl.static_range(4):
        # out-row 4h + r at in-column 4g + c: W̃ᵀ's value there (zero if none) and the slot score
        # cuSPARSELt's metadata is chosen by (2: W̃ᵀ keeps it, 1: W only, 0: pruned)
        a = code & 7
        b = (code >> 3) & 7
        in_w0 = ((a & 3) == c) | ((b & 3) == c)
        kept0 = (a == c + 4) | (b == c + 4)
        d0 = tl.where(a == c + 4, v00, tl.where(b == c + 4, v01, zero))
        a = (code >> 6) & 7
        b = (code >> 9) & 7
        in_w1 = ((a & 3) == c) | ((b & 3) == c)
        kept1 = (a == c + 4) | (b == c + 4)
        d1 = tl.where(a == c + 4, v10, tl.where(b == c + 4, v11, zero))
        a = (code >> 12) & 7
        b = (code >> 15) & 7
        in_w2 = ((a & 3) == c) | ((b & 3) == c)
        kept2 = (a == c + 4) | (b == c + 4)
        d2 = tl.where(a == c + 4, v20, tl.where(b == c + 4, v21, zero))
        a = (code >> 18) & 7
        b = (code >> 21) & 7
        in_w3 = ((a & 3) == c) | ((b & 3) == c)
        kept3 = (a == c + 4) | (b == c + 4)
        d3 = tl.where(a == c + 4, v30, tl.where(b == c + 4, v31, zero))
        s0 = in_w0.to(tl.int32) + kept0.to(tl.int32)
        s1 = in_w1.to(tl.int32) + kept1.to(tl.int32)
        s2 = in_w2.to(tl.int32) + kept2.to(tl.int32)
        s3 = in_w3.to(tl.int32) + kept3.to(tl.int32)
        # the 2 best scores (ties to the lower row) are the slots, ascending: rank < 2 selects
        top0 = ((s1 > s0).to(tl.int32) + (s2 > s0).to(tl.int32) + (s3 > s0).to(tl.int32)) < 2
        top1 = ((s0 >= s1).to(tl.int32) + (s2 > s1).to(tl.int32) + (s3 > s1).to(tl.int32)) < 2
        top2 = ((s0 >= s2).to(tl.int32) + (s1 >= s2).to(tl.int32) + (s3 > s2).to(tl.int32)) < 2
        top3 = ((s0 >= s3).to(tl.int32) + (s1 >= s3).to(tl.int32) + (s2 >= s3).to(tl.int32)) < 2
        o0 = tl.where(top0, d0, tl.where(top1, d1, d2))  # the lower slot
        o1 = tl.where(top3, d3, tl.where(top2, d2, d1))  # the higher slot
        row = tl.reshape(tl.join(o0, o1), [BLOCK_G, 2 * BLOCK_H])  # interleave j = 0, 1
        tl.store(o_ptr + (4 * gt + c) * so0 + ct * so1, row, mask=mt)


_KERNEL = DualKernel(_transpose_values_kernel)


def transpose_values_reference(values: torch.Tensor, idx: torch.Tensor, keep_t: torch.Tensor) -> torch.Tensor:
    """Pure-torch W̃ᵀ values: scatter ``values`` where ``keep_t`` into ``(out, in)``, transpose, gather the
    slots of :func:`kernels.masks.slots_reference`.

    Same definition as ``dsparse.backends.cusparselt._transpose_values`` with ``transpose_slots``.
    """
    rows, kept = values.shape
    dense = torch.zeros(rows, kept // 2, 4, dtype=values.dtype, device=values.device)
    kept_vals = torch.where(keep_t, values, torch.zeros_like(values))
    dense.scatter_(-1, idx.long().reshape(rows, kept // 2, 2), kept_vals.reshape(rows, kept // 2, 2))
    dense_t = dense.reshape(rows, kept * 2).t().contiguous()  # (in, out)
    in_features = kept * 2
    groups = dense_t.reshape(in_features, rows // 4, 4)
    slots_t = slots_reference(idx, keep_t)
    return torch.gather(groups, -1, slots_t.long().reshape(in_features, rows // 4, 2)).reshape(in_features, rows // 2)


def transpose_values(values: torch.Tensor, idx: torch.Tensor, keep_t: torch.Tensor,
                     out: torch.Tensor | None = None, *, values_out: torch.Tensor | None = None,
                     config: dict[str, int] | None = None) -> torch.Tensor:
    """Kept values ``(in, out/2)`` of the double-pruned transpose W̃ᵀ of a 2:4 weight, in one pass.

    ``values`` ``(out, in/2)`` (fp16/bf16/fp32/fp64), ``idx`` (uint8 positions 0..3) and
    ``keep_t`` (bool) describe ``W`` as in :mod:`dsparse.nm`. W̃ᵀ's two slots per group of 4
    along ``out`` are those :func:`kernels.masks.slots_reference` names (its kept entries,
    then fillers, ascending), derived here on the fly so no slot table is stored. Entry
    ``[i, 2h + j]`` of the result is ``W̃ᵀ[i, 4h + slot_j]`` (zero where that slot is a filler).
    ``out``: write there instead (any strides, e.g. the values region
    ``packed.view(-1)[: in*out//2].view(in, out//2)`` of a compressed operand) and return it.
    ``values_out`` (``(out, in/2)``, ``values``' dtype): also copy ``values`` there in the
    same pass (W's own values region), so a whole refresh reads ``values`` once.
    Bit-identical to :func:`transpose_values_reference`. CPU tensors run through the
    Triton interpreter (slow: for tests). ``config`` overrides :data:`CONFIG` (tuning).
    """
    what = "transpose_values"
    check_2d(what, "values", values, dtypes=VALUE_DTYPES)
    rows, kept = values.shape
    if rows % 4:
        raise ValueError(f"{what}: out_features = {rows} must be a multiple of 4 (2:4 groups along out)")
    if kept % 2:
        raise ValueError(f"{what}: values has {kept} columns; 2:4 kept values need an even count (in/2)")
    in_features = kept * 2
    check_2d(what, "idx", idx, shape=(rows, kept), dtypes=(torch.uint8,))
    check_2d(what, "keep_t", keep_t, shape=(rows, kept), dtypes=(torch.bool,))
    if out is None:
        out = torch.empty(in_features, rows // 2, dtype=values.dtype, device=values.device)
    else:
        check_2d(what, "out", out, shape=(in_features, rows // 2), dtypes=(values.dtype,))
    if values_out is not None:
        check_2d(what, "values_out", values_out, shape=(rows, kept), dtypes=(values.dtype,))
    check_same_device(what, values, idx=idx, keep_t=keep_t, out=out, values_out=values_out)
    if values.numel() == 0:
        return out
    keep_u8 = keep_t.view(torch.uint8)
    cfg = {**CONFIG, **(config or {})}
    grid = (cdiv(rows // 4, cfg["BLOCK_H"]), cdiv(in_features // 4, cfg["BLOCK_G"]))
    _KERNEL.launch(values.device, grid,
                   values, idx, keep_u8, out, values if values_out is None else values_out,
                   rows // 4, in_features // 4,
                   values.stride(0), values.stride(1), idx.stride(0), idx.stride(1),
                   keep_u8.stride(0), keep_u8.stride(1), out.stride(0), out.stride(1),
                   0 if values_out is None else values_out.stride(0), 0 if values_out is None else values_out.stride(1),
                   HAS_COPY=values_out is not None, **cfg)
    return out
