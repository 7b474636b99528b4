"""Values of the double-pruned transpose W̃ᵀ (2:4), in one pass: the per-step refresh.

After every optimizer step the compressed W̃ᵀ operand gets new values (its mask, and so
``slots_t``, stays). This kernel reads ``values``/``idx``/``keep_t`` of ``W`` once and
writes W̃ᵀ's kept values, optionally straight into the values region of the compressed
operand (``out=``), and optionally copies ``values`` into W's own compressed operand in
the same pass (``values_out=``): the whole cuSPARSELt refresh in one kernel.

Tiling: a program owns ``BLOCK_H x BLOCK_G`` whole 4x4 blocks (4 out-rows x one in-group
of 4 columns). It loads the kept values, positions and ``keep_t`` of its ``4*BLOCK_H``
out-rows (``2*BLOCK_G`` kept values each), packs the 8 effective positions per block
(``keep_t`` folded in: a value W̃ᵀ drops gets position 4, which never matches) into one
int32, transposes values and codes in registers/shared memory (``tl.trans``), and for each
of its ``4*BLOCK_G`` in-rows writes the ``2*BLOCK_H`` values W̃ᵀ keeps at ``slots_t``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import DualKernel, check_2d, check_same_device

__all__ = ["transpose_values", "transpose_values_reference", "VALUE_DTYPES"]

VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# 4x4 blocks per program along out (BLOCK_H) and along in (BLOCK_G), powers of two
CONFIG = {"BLOCK_H": 32, "BLOCK_G": 32, "num_warps": 8}


def _transpose_values_kernel(
    v_ptr, i_ptr, k_ptr, s_ptr, o_ptr, c_ptr,
    n_h, n_g,  # out // 4, in // 4
    sv0, sv1, si0, si1, sk0, sk1, ss0, ss1, so0, so1, sc0, sc1,
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
    # effective position of every kept value, 3 bits each, 8 per 4x4 block in one int32:
    # its position 0..3 where W̃ᵀ keeps it, 4 (matches no column) where W̃ᵀ drops it
    code = tl.full([BLOCK_H, BLOCK_G], 0, dtype=tl.int32)
    for r in tl.static_range(4):
        pos = tl.load(i_ptr + (4 * hw + r) * si0 + cw * si1, mask=mw, other=0).to(tl.int32)
        keep = tl.load(k_ptr + (4 * hw + r) * sk0 + cw * sk1, mask=mw, other=0)
        eff = tl.where(keep != 0, pos & 3, 4)
        eff0, eff1 = tl.split(tl.reshape(eff, [BLOCK_H, BLOCK_G, 2]))
        code = code | (eff0 << (6 * r)) | (eff1 << (6 * r + 3))

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
        # W̃ᵀ[4g + c, 4h + r]: row 4h + r's kept value at position c, if W̃ᵀ keeps it
        d0 = tl.where((code & 7) == c, v00, tl.where(((code >> 3) & 7) == c, v01, zero))
        d1 = tl.where(((code >> 6) & 7) == c, v10, tl.where(((code >> 9) & 7) == c, v11, zero))
        d2 = tl.where(((code >> 12) & 7) == c, v20, tl.where(((code >> 15) & 7) == c, v21, zero))
        d3 = tl.where(((code >> 18) & 7) == c, v30, tl.where(((code >> 21) & 7) == c, v31, zero))
        slots = tl.load(s_ptr + (4 * gt + c) * ss0 + ct * ss1, mask=mt, other=0)
        s0, s1 = tl.split(tl.reshape(slots, [BLOCK_G, BLOCK_H, 2]))
        o0 = tl.where(s0 == 0, d0, tl.where(s0 == 1, d1, tl.where(s0 == 2, d2, d3)))
        o1 = tl.where(s1 == 0, d0, tl.where(s1 == 1, d1, tl.where(s1 == 2, d2, d3)))
        row = tl.reshape(tl.join(o0, o1), [BLOCK_G, 2 * BLOCK_H])  # interleave j = 0, 1
        tl.store(o_ptr + (4 * gt + c) * so0 + ct * so1, row, mask=mt)


_KERNEL = DualKernel(_transpose_values_kernel)


def transpose_values_reference(values: torch.Tensor, idx: torch.Tensor, keep_t: torch.Tensor,
                               slots_t: torch.Tensor) -> torch.Tensor:
    """Pure-torch W̃ᵀ values: scatter ``values`` where ``keep_t`` into ``(out, in)``, transpose, gather ``slots_t``.

    Same definition as ``dsparse.backends.cusparselt._transpose_values``.
    """
    rows, kept = values.shape
    dense = torch.zeros(rows, kept // 2, 4, dtype=values.dtype, device=values.device)
    kept_vals = torch.where(keep_t, values, torch.zeros_like(values))
    dense.scatter_(-1, idx.long().reshape(rows, kept // 2, 2), kept_vals.reshape(rows, kept // 2, 2))
    dense_t = dense.reshape(rows, kept * 2).t().contiguous()  # (in, out)
    in_features = kept * 2
    groups = dense_t.reshape(in_features, rows // 4, 4)
    return torch.gather(groups, -1, slots_t.long().reshape(in_features, rows // 4, 2)).reshape(in_features, rows // 2)


def transpose_values(values: torch.Tensor, idx: torch.Tensor, keep_t: torch.Tensor, slots_t: torch.Tensor,
                     out: torch.Tensor | None = None, *, values_out: torch.Tensor | None = None,
                     config: dict[str, int] | None = None) -> torch.Tensor:
    """Kept values ``(in, out/2)`` of the double-pruned transpose W̃ᵀ of a 2:4 weight, in one pass.

    ``values`` ``(out, in/2)`` (fp16/bf16/fp32/fp64), ``idx`` (uint8 positions 0..3) and
    ``keep_t`` (bool) describe ``W`` as in :mod:`dsparse.nm`; ``slots_t`` (uint8,
    ``(in, out/2)``) names W̃ᵀ's two slots per group of 4 along ``out``. Entry
    ``[i, 2h + j]`` of the result is ``W̃ᵀ[i, 4h + slots_t[i, 2h + j]]`` (zero where that
    slot is a filler). ``out``: write there instead (any strides, e.g. the values region
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
    check_2d(what, "slots_t", slots_t, shape=(in_features, rows // 2), dtypes=(torch.uint8,))
    if out is None:
        out = torch.empty(in_features, rows // 2, dtype=values.dtype, device=values.device)
    else:
        check_2d(what, "out", out, shape=(in_features, rows // 2), dtypes=(values.dtype,))
    if values_out is not None:
        check_2d(what, "values_out", values_out, shape=(rows, kept), dtypes=(values.dtype,))
    check_same_device(what, values, idx=idx, keep_t=keep_t, slots_t=slots_t, out=out, values_out=values_out)
    if values.numel() == 0:
        return out
    keep_u8 = keep_t.view(torch.uint8)
    cfg = {**CONFIG, **(config or {})}
    grid = (triton.cdiv(rows // 4, cfg["BLOCK_H"]), triton.cdiv(in_features // 4, cfg["BLOCK_G"]))
    _KERNEL.launch(values.device, grid,
                   values, idx, keep_u8, slots_t, out, values if values_out is None else values_out,
                   rows // 4, in_features // 4,
                   values.stride(0), values.stride(1), idx.stride(0), idx.stride(1),
                   keep_u8.stride(0), keep_u8.stride(1), slots_t.stride(0), slots_t.stride(1),
                   out.stride(0), out.stride(1),
                   0 if values_out is None else values_out.stride(0), 0 if values_out is None else values_out.stride(1),
                   HAS_COPY=values_out is not None, **cfg)
    return out
