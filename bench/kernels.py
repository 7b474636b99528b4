"""The Triton kernels (kernels/) against the torch code they replace, on one GPU.

* ``transpose_values`` (the per-step refresh of W̃ᵀ's compressed values) vs
  ``cusparselt._transpose_values``, plus a small sweep of tile configs, and the whole
  backend refresh (both values regions: ``out=`` + ``values_out=``) vs today's two copies;
* ``transpose_keep_and_slots`` (mask change) vs ``nm.transpose_keep`` + ``transpose_slots``;
* ``lowrank_addmm`` (``y + scale * u @ bᵀ + bias``) vs ``torch.addmm`` (+ bias), and
  ``bias_add`` vs ``y + bias``;
* ``mvue_compress`` (MVUE ``S(dYᵀ)`` written straight into cuSPARSELt's layout) against a copy of
  ``dY`` (the bandwidth it could reach), with a sweep of tile configs;
* ``mvue_compress_swiglu`` (SwiGLU's backward writing the gate/up weight gradient's MVUE
  ``S(dYᵀ)`` in its own pass) against ``silu_mul_backward`` then ``mvue_compress``, results
  checked bit for bit, with the MVUE tile sweep;
* ``skinny_sparse_mm`` (a decoding step's few-token product straight from the compressed
  operand) vs the dense GEMM on the decompressed weight (cuBLAS), with a sweep of tile
  configs, at llama-1b's decode shapes (cuSPARSELt's algorithms at those token counts:
  ``bench.tune --tokens 8``);
* the fused RMSNorm and SwiGLU gate (:mod:`dsparse.nn.fused`) vs HF's ``LlamaRMSNorm`` and
  ``silu(g) * u``, forward + backward through autograd (eager, so autograd's host time counts
  too; the step profiles of ``bench.step --profile`` give the kernels' own GPU time), at
  llama-1b's widths.

Every kernel result is checked against its reference first (bit-exact for the gathers).
Times are eager medians (``bench.common.time_ms``); GB/s counts each tensor read or
written once.

    python -m bench.kernels                      # writes bench/results/kernels_<gpu>.json
    python -m bench.kernels --dry-run            # tiny shapes, CPU interpreter, wall-clock timer: logic check
"""
from __future__ import annotations

import argparse
import functools
import time

import torch

from bench.common import gpu_tag, time_ms, write_result
from dsparse import nm
from dsparse.backends.cusparselt import _transpose_values, transpose_slots
from kernels import bias_add, lowrank_addmm, transpose_keep_and_slots, transpose_values
from kernels import lowrank as lowrank_mod
from kernels import mvue as mvue_mod
from kernels import masks as masks_mod
from kernels import refresh as refresh_mod
from kernels import skinny as skinny_mod

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
REFRESH_CONFIGS = [
    {"BLOCK_H": 32, "BLOCK_G": 32, "num_warps": 8},
    {"BLOCK_H": 32, "BLOCK_G": 32, "num_warps": 4},
    {"BLOCK_H": 32, "BLOCK_G": 16, "num_warps": 4},
    {"BLOCK_H": 16, "BLOCK_G": 32, "num_warps": 4},
    {"BLOCK_H": 16, "BLOCK_G": 16, "num_warps": 4},
    {"BLOCK_H": 64, "BLOCK_G": 32, "num_warps": 8},
    {"BLOCK_H": 16, "BLOCK_G": 16, "num_warps": 2},
    {"BLOCK_H": 16, "BLOCK_G": 32, "num_warps": 2},
    {"BLOCK_H": 8, "BLOCK_G": 32, "num_warps": 2},
]
MASK_CONFIGS = [
    {"BLOCK_H": 16, "BLOCK_G": 16, "num_warps": 4},
    {"BLOCK_H": 32, "BLOCK_G": 16, "num_warps": 4},
    {"BLOCK_H": 32, "BLOCK_G": 32, "num_warps": 8},
]
MVUE_CONFIGS = [
    {"BLOCK_C": 64, "BLOCK_P": 32, "num_warps": 4},
    {"BLOCK_C": 64, "BLOCK_P": 64, "num_warps": 4},
    {"BLOCK_C": 128, "BLOCK_P": 32, "num_warps": 4},
    {"BLOCK_C": 128, "BLOCK_P": 64, "num_warps": 8},
    {"BLOCK_C": 256, "BLOCK_P": 16, "num_warps": 4},
    {"BLOCK_C": 256, "BLOCK_P": 32, "num_warps": 8},
    {"BLOCK_C": 128, "BLOCK_P": 128, "num_warps": 8},
    {"BLOCK_C": 64, "BLOCK_P": 128, "num_warps": 4},
    {"BLOCK_C": 64, "BLOCK_P": 32, "num_warps": 2},
    {"BLOCK_C": 64, "BLOCK_P": 32, "num_warps": 8},
    {"BLOCK_C": 64, "BLOCK_P": 16, "num_warps": 2},
    {"BLOCK_C": 64, "BLOCK_P": 64, "num_warps": 8},
]
SECTIONS = ("refresh", "lowrank", "mvue", "swiglu_mvue", "skinny", "fused")
SKINNY_CONFIGS = [
    {"BLOCK_R": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3, "SPLIT_K": 0},  # kernels.skinny.CONFIG
    {"BLOCK_R": 16, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "SPLIT_K": 1},  # session 14's: k not split
    {"BLOCK_R": 16, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "SPLIT_K": 0},
    {"BLOCK_R": 16, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "SPLIT_K": 8},
    {"BLOCK_R": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "SPLIT_K": 0},
    # session 15's sweep: 64-row tiles were fastest at every shape, split k helped 16-row tiles a little
    {"BLOCK_R": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3, "SPLIT_K": 1},
    {"BLOCK_R": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3, "SPLIT_K": 0},
    {"BLOCK_R": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2, "SPLIT_K": 0},
    {"BLOCK_R": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 4, "SPLIT_K": 0},
    {"BLOCK_R": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "SPLIT_K": 0},
    {"BLOCK_R": 64, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3, "SPLIT_K": 0},
    {"BLOCK_R": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3, "SPLIT_K": 0},
    {"BLOCK_R": 128, "BLOCK_K": 32, "num_warps": 4, "num_stages": 4, "SPLIT_K": 0},
]
LOWRANK_CONFIGS = [
    {"BLOCK_T": 128, "BLOCK_N": 128, "num_warps": 8},
    {"BLOCK_T": 128, "BLOCK_N": 128, "num_warps": 4},
    {"BLOCK_T": 64, "BLOCK_N": 128, "num_warps": 4},
    {"BLOCK_T": 128, "BLOCK_N": 64, "num_warps": 4},
    {"BLOCK_T": 64, "BLOCK_N": 64, "num_warps": 4},  # lowrank_silu_mul's (CONFIG_GATED)
    {"BLOCK_T": 64, "BLOCK_N": 256, "num_warps": 8},
]


def _wall_ms(fn, warmup: int = 1, iters: int = 1, **_) -> float:
    """Stand-in timer for --dry-run (CPU): wall-clock milliseconds of one call."""
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) * 1e3 / iters


def _gbps(nbytes: int, ms: float) -> float:
    return nbytes / ms / 1e6


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _best(timings: list[dict]) -> dict:
    return min(timings, key=lambda t: t["ms"])


def bench_refresh(in_f: int, out_f: int, dtype: torch.dtype, device: str, timer, sweep: bool) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    dense = torch.randn(out_f, in_f, generator=gen, device=device).to(dtype)
    idx = nm.kept_positions(nm.nm_mask(dense.abs().float(), 2, 4), 2, 4)
    values = nm.gather_kept(dense, idx, 4)
    del dense
    keep_t = nm.transpose_keep(values, idx, 2, 4)
    slots_t = transpose_slots(idx, keep_t)

    # correctness first
    want = _transpose_values(values, idx, keep_t, slots_t)
    assert torch.equal(transpose_values(values, idx, keep_t), want), "transpose_values mismatch"
    got_keep, got_slots = transpose_keep_and_slots(values, idx)
    assert torch.equal(got_keep, keep_t) and torch.equal(got_slots, slots_t), "transpose_keep_and_slots mismatch"

    # out= into the values region of a compressed-operand-sized buffer (W̃ᵀ's), values_out= into W's
    packed = torch.empty(in_f * out_f // 2 * 9 // 8, dtype=dtype, device=device)
    region = packed.view(-1)[: in_f * out_f // 2].view(in_f, out_f // 2)
    packed_w = torch.empty(in_f * out_f // 2 * 9 // 8, dtype=dtype, device=device)
    region_w = packed_w.view(-1)[: in_f * out_f // 2].view(out_f, in_f // 2)

    def refresh_torch():  # what CusparseltBackend.refresh does today
        region_w.copy_(values)
        region.copy_(_transpose_values(values, idx, keep_t, slots_t))

    moved = _nbytes(values, idx, keep_t, want)
    row = {
        "refresh_torch_ms": timer(lambda: _transpose_values(values, idx, keep_t, slots_t)),
        "refresh_torch_copy_ms": timer(lambda: region.copy_(_transpose_values(values, idx, keep_t, slots_t))),
        "refresh_kernel_out_ms": timer(lambda: transpose_values(values, idx, keep_t, out=region)),
        "refresh_bytes": moved,
        # the whole backend refresh (both operands' values regions)
        "full_refresh_torch_ms": timer(refresh_torch),
        "full_refresh_kernel_ms": timer(lambda: transpose_values(values, idx, keep_t, out=region,
                                                                 values_out=region_w)),
    }
    row["full_refresh_speedup"] = row["full_refresh_torch_ms"] / row["full_refresh_kernel_ms"]
    configs = REFRESH_CONFIGS if sweep else [refresh_mod.CONFIG]
    row["refresh_configs"] = [{"config": cfg, "ms": timer(lambda: transpose_values(values, idx, keep_t,
                                                                                  config=cfg))} for cfg in configs]
    row["refresh_kernel_ms"] = next(t["ms"] for t in row["refresh_configs"] if t["config"] == refresh_mod.CONFIG) \
        if refresh_mod.CONFIG in configs else row["refresh_configs"][0]["ms"]
    best = _best(row["refresh_configs"])
    row["refresh_best_config"] = best["config"]
    row["refresh_speedup"] = row["refresh_torch_ms"] / row["refresh_kernel_ms"]
    row["refresh_kernel_gbps"] = _gbps(moved, row["refresh_kernel_ms"])
    row["refresh_best_gbps"] = _gbps(moved, best["ms"])

    def mask_torch():
        k = nm.transpose_keep(values, idx, 2, 4)
        return transpose_slots(idx, k)

    row["mask_torch_ms"] = timer(mask_torch, iters=5, inner=1) if timer is time_ms else timer(mask_torch)
    configs = MASK_CONFIGS if sweep else [masks_mod.CONFIG]
    row["mask_configs"] = [{"config": cfg, "ms": timer(lambda: transpose_keep_and_slots(values, idx, config=cfg))}
                           for cfg in configs]
    row["mask_kernel_ms"] = next(t["ms"] for t in row["mask_configs"] if t["config"] == masks_mod.CONFIG) \
        if masks_mod.CONFIG in configs else row["mask_configs"][0]["ms"]
    row["mask_best_config"] = _best(row["mask_configs"])["config"]
    row["mask_speedup"] = row["mask_torch_ms"] / row["mask_kernel_ms"]
    return row


def bench_lowrank(tokens: int, out_f: int, rank: int, dtype: torch.dtype, device: str, timer, sweep: bool) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    y = torch.randn(tokens, out_f, generator=gen, device=device).to(dtype)
    u = torch.randn(tokens, rank, generator=gen, device=device).to(dtype)
    b = (torch.randn(out_f, rank, generator=gen, device=device) / rank**0.5).to(dtype)
    bias = torch.randn(out_f, generator=gen, device=device).to(dtype)
    scale = 0.5

    want = (y.double() + scale * (u.double() @ b.double().t()) + bias.double())
    got = lowrank_addmm(y, u, b, scale, bias)
    ref = torch.addmm(y, u, b.t(), alpha=scale) + bias
    row = {
        "kernel_max_abs_err": (got.double() - want).abs().max().item(),
        "torch_max_abs_err": (ref.double() - want).abs().max().item(),
        "bytes": 2 * _nbytes(y) + _nbytes(u, b, bias),
    }
    y_work = y.clone()
    row["torch_addmm_ms"] = timer(lambda: torch.addmm(y, u, b.t(), alpha=scale))
    row["torch_addmm_bias_ms"] = timer(lambda: torch.addmm(y, u, b.t(), alpha=scale).add_(bias))
    row["torch_addmm_inplace_ms"] = timer(lambda: y_work.addmm_(u, b.t(), alpha=scale))
    configs = LOWRANK_CONFIGS if sweep else [lowrank_mod.CONFIG]
    row["configs"] = [{"config": cfg, "ms": timer(lambda: lowrank_addmm(y, u, b, scale, config=cfg))}
                      for cfg in configs]
    row["kernel_ms"] = next(t["ms"] for t in row["configs"] if t["config"] == lowrank_mod.CONFIG) \
        if lowrank_mod.CONFIG in configs else row["configs"][0]["ms"]
    row["best_config"] = _best(row["configs"])["config"]
    row["kernel_bias_ms"] = timer(lambda: lowrank_addmm(y, u, b, scale, bias))
    row["kernel_inplace_ms"] = timer(lambda: lowrank_addmm(y_work, u, b, scale, inplace=True))
    row["speedup_vs_addmm"] = row["torch_addmm_ms"] / row["kernel_ms"]
    row["speedup_vs_addmm_bias"] = row["torch_addmm_bias_ms"] / row["kernel_bias_ms"]
    row["kernel_gbps"] = _gbps(row["bytes"], row["kernel_ms"])
    row["bias_add_torch_ms"] = timer(lambda: y + bias)
    row["bias_add_kernel_ms"] = timer(lambda: bias_add(y, bias))
    return row


def bench_gather(in_f: int, out_f: int, dtype, device, timer) -> dict:
    """The weight gradient's reduction to kept entries: Triton gather vs torch (int64 index)."""
    from dsparse import nm
    from kernels import gather_kept

    gen = torch.Generator(device=device).manual_seed(1)
    dense = torch.randn(out_f, in_f, generator=gen, device=device).to(dtype)
    idx = nm.kept_positions(nm.nm_mask(dense.abs().float(), 2, 4), 2, 4)
    assert torch.equal(gather_kept(dense, idx, 2, 4), nm.gather_kept(dense, idx, 4))
    row = {"gather_torch_ms": timer(lambda: nm.gather_kept(dense, idx, 4)),
           "gather_kernel_ms": timer(lambda: gather_kept(dense, idx, 2, 4))}
    row["gather_speedup"] = row["gather_torch_ms"] / row["gather_kernel_ms"]
    return row


def bench_mvue(tokens: int, out_f: int, dtype, device, timer, sweep: bool) -> dict:
    """``mvue_compress`` of a ``(tokens, out)`` output gradient (checked bit for bit against its torch
    reference) vs ``dy.clone()``, which moves about as many bytes (reads dY, writes half plus metadata)."""
    from kernels import mvue_compress, mvue_compress_reference

    gen = torch.Generator(device=device).manual_seed(3)
    dy = torch.randn(tokens, out_f, generator=gen, device=device).to(dtype)
    key = nm.mvue_key(0, 1, 2)
    packed = mvue_compress(dy, key, tokens)
    assert torch.equal(packed.view(torch.uint8), mvue_compress_reference(dy, key, tokens).view(torch.uint8))
    moved = _nbytes(dy, packed)
    timings = []
    for cfg in (MVUE_CONFIGS if sweep else [mvue_mod.CONFIG]):
        ms = timer(lambda: mvue_compress(dy, key, tokens, config=cfg))
        timings.append({"config": cfg, "ms": ms, "gbps": _gbps(moved, ms)})
    copy_ms = timer(lambda: dy.clone())
    default = next(t for t in timings if t["config"] == mvue_mod.CONFIG) if sweep else timings[0]
    best = _best(timings)
    return {"tokens": tokens, "out": out_f, "kernel_ms": default["ms"], "kernel_gbps": default["gbps"],
            "copy_ms": copy_ms, "copy_gbps": _gbps(2 * _nbytes(dy), copy_ms), "best_config": best["config"],
            "best_ms": best["ms"], "best_gbps": best["gbps"], "sweep": timings}


def bench_skinny(tokens: int, in_f: int, out_f: int, dtype, device, timer, sweep: bool) -> dict:
    """``skinny_sparse_mm`` of ``(tokens, in)`` on a compressed ``(out, in)`` operand (checked against its
    reference) vs ``F.linear`` on the decompressed weight, timed by ``timer`` (CUDA graph replays: at a few
    microseconds a call, eager times would be launch latency); GB/s counts operand, input and output once."""
    from kernels import skinny_sparse_mm, skinny_sparse_mm_reference
    from kernels.cslt_meta import compress_reference, decompress_reference

    gen = torch.Generator(device=device).manual_seed(4)
    w = torch.randn(out_f, in_f, generator=gen, device=device).to(dtype)
    idx = nm.kept_positions(nm.nm_mask(w.abs().float(), 2, 4), 2, 4)
    packed = compress_reference(nm.gather_kept(w, idx, 4), idx)
    dense = decompress_reference(packed, in_f)
    x = torch.randn(tokens, in_f, generator=gen, device=device).to(dtype)
    y = skinny_sparse_mm(packed, x)
    err = ((y.float() - skinny_sparse_mm_reference(packed, x).float()).norm() / y.float().norm()).item()
    assert err < 1e-2, f"skinny_sparse_mm differs from its reference: relative error {err:.3g}"
    moved = _nbytes(packed, x, y)
    timings = []
    for cfg in (SKINNY_CONFIGS if sweep else [skinny_mod.CONFIG]):
        ms = timer(lambda: skinny_sparse_mm(packed, x, config=cfg))
        timings.append({"config": cfg, "ms": ms, "gbps": _gbps(moved, ms)})
    dense_ms = timer(lambda: torch.nn.functional.linear(x, dense))
    default = next(t for t in timings if t["config"] == skinny_mod.CONFIG) if sweep else timings[0]
    best = _best(timings)
    return {"tokens": tokens, "in": in_f, "out": out_f, "kernel_ms": default["ms"], "kernel_gbps": default["gbps"],
            "dense_ms": dense_ms, "dense_gbps": _gbps(_nbytes(dense, x, y), dense_ms),
            "speedup": dense_ms / default["ms"], "best_config": best["config"], "best_ms": best["ms"],
            "best_speedup": dense_ms / best["ms"], "sweep": timings,
            **_bench_skinny_mma(packed, x, moved, dense_ms, timer, sweep)}


def _bench_skinny_mma(packed: torch.Tensor, x: torch.Tensor, moved: int, dense_ms: float, timer, sweep: bool) -> dict:
    """The same product on the sparse tensor cores (``kernels.skinny_mma``, where the device has them), checked
    against the reference, over its launch configurations when sweeping (``mma_*``: the one
    :func:`kernels.skinny_mma.launch_config` picks; none where the kernel does not run)."""
    from kernels import skinny_sparse_mm_reference
    from kernels import skinny_mma as mma_mod

    if not (mma_mod.available(x.device) and x.shape[0] <= mma_mod.MAX_TOKENS):
        return {}
    y = mma_mod.skinny_mma_sparse_mm(packed, x)
    err = ((y.float() - skinny_sparse_mm_reference(packed, x).float()).norm() / y.float().norm()).item()
    assert err < 1e-2, f"skinny_mma_sparse_mm differs from its reference: relative error {err:.3g}"
    default = mma_mod.launch_config(packed.shape[0], x.device)
    configs = [{"warps_k": w, "row_tiles": r, "batch": b} for w in (2, 4, 8) for r in (1, 2) for b in (1, 2)]
    timings = []
    for cfg in (configs if sweep else [default]):
        ms = timer(lambda c=cfg: mma_mod.skinny_mma_sparse_mm(packed, x, **c, validate=False))
        timings.append({**cfg, "ms": ms, "gbps": _gbps(moved, ms)})
    mine = next(t for t in timings if all(t[k] == v for k, v in default.items()))
    best = min(timings, key=lambda t: t["ms"])
    return {"mma_ms": mine["ms"], "mma_gbps": mine["gbps"], "mma_speedup": dense_ms / mine["ms"],
            "mma_best_config": {k: best[k] for k in default}, "mma_best_ms": best["ms"], "mma_sweep": timings}


def bench_swiglu_mvue(tokens: int, inter: int, dtype, device, timer, sweep: bool) -> dict:
    """SwiGLU's backward with the gate/up MVUE ``S(dYᵀ)`` in one pass vs the two kernels it replaces
    (``silu_mul_backward`` into ``[dg | du]``, then ``mvue_compress`` of that), checked bit for bit."""
    from kernels import mvue_compress, mvue_compress_swiglu, silu_mul_backward

    gen = torch.Generator(device=device).manual_seed(4)
    gate_up = torch.randn(tokens, 2 * inter, generator=gen, device=device).to(dtype)
    dh = torch.randn(tokens, inter, generator=gen, device=device).to(dtype)
    key = nm.mvue_key(0, 1, 3)
    dgu = torch.empty_like(gate_up)

    def two_kernels():
        silu_mul_backward(dh, gate_up[:, :inter], gate_up[:, inter:], out=(dgu[:, :inter], dgu[:, inter:]))
        return mvue_compress(dgu, key, tokens)

    want = two_kernels()
    got_dgu, got = mvue_compress_swiglu(dh, gate_up, key, tokens)
    assert torch.equal(got_dgu.view(torch.int16), dgu.view(torch.int16))
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    moved = _nbytes(gate_up, dh, dgu, got)  # read [g | u] and dh, write [dg | du] and S compressed
    out = torch.empty_like(gate_up)
    timings = []
    for cfg in (MVUE_CONFIGS if sweep else [mvue_mod.SWIGLU_CONFIG]):
        ms = timer(lambda: mvue_compress_swiglu(dh, gate_up, key, tokens, out=out, config=cfg))
        timings.append({"config": cfg, "ms": ms, "gbps": _gbps(moved, ms)})
    default = next(t for t in timings if t["config"] == mvue_mod.SWIGLU_CONFIG) if sweep else timings[0]
    best = _best(timings)
    two_ms = timer(two_kernels)
    return {"tokens": tokens, "inter": inter, "kernel_ms": default["ms"], "kernel_gbps": default["gbps"],
            "two_kernels_ms": two_ms, "speedup": two_ms / default["ms"], "best_config": best["config"],
            "best_ms": best["ms"], "best_gbps": best["gbps"], "sweep": timings}


def bench_fused(tokens: int, hidden: int, inter: int, dtype, device, timer) -> dict:
    """Forward + backward of HF's RMSNorm, SwiGLU gate and rotary embedding (queries and keys of 64-wide
    heads, keys grouped 8:1 as llama-1b's, batch 8) vs the fused ones (same inputs, results checked)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    from dsparse.nn.fused import FusedRMSNorm, _fused_rotary, _SiluMulFunction

    gen = torch.Generator(device=device).manual_seed(2)
    hf = LlamaRMSNorm(hidden).to(device, dtype)
    fused = FusedRMSNorm(hf.weight, hf.variance_epsilon, min_rows=0)
    x = torch.randn(tokens, hidden, generator=gen, device=device).to(dtype).requires_grad_(True)
    dy = torch.randn(tokens, hidden, generator=gen, device=device).to(dtype)
    g, u = (torch.randn(tokens, inter, generator=gen, device=device).to(dtype).requires_grad_(True)
            for _ in range(2))
    dh = torch.randn(tokens, inter, generator=gen, device=device).to(dtype)
    torch.testing.assert_close(fused(x), hf(x), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(_SiluMulFunction.apply(g, u), torch.nn.functional.silu(g) * u, rtol=2e-2, atol=2e-2)
    heads, batch = hidden // 64, 8
    q = torch.randn(batch, tokens // batch, heads, 64, generator=gen, device=device).to(dtype).transpose(1, 2)
    k = torch.randn(batch, tokens // batch, max(1, heads // 8), 64, generator=gen, device=device)
    k = k.to(dtype).transpose(1, 2)
    q.requires_grad_(True), k.requires_grad_(True)
    angles = torch.rand(1, tokens // batch, 32, generator=gen, device=device) * 1000
    cos, sin = (f(torch.cat((angles, angles), -1)).to(dtype) for f in (torch.cos, torch.sin))
    fused_rope = _fused_rotary(apply_rotary_pos_emb, min_rows=0)
    for got, want in zip(fused_rope(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    dq, dk = (torch.randn(t.shape, generator=gen, device=device).to(dtype) for t in (q, k))

    def rope_step(rope):
        torch.autograd.backward(rope(q, k, cos, sin), (dq, dk))
        q.grad = k.grad = None

    def step(fn, inputs, grad):
        fn(*inputs).backward(grad)
        for t in inputs:
            t.grad = None
        hf.weight.grad = None

    row = {"tokens": tokens, "hidden": hidden, "inter": inter,
           "rms_norm_hf_ms": timer(lambda: step(hf, (x,), dy)),
           "rms_norm_fused_ms": timer(lambda: step(fused, (x,), dy)),
           "swiglu_hf_ms": timer(lambda: step(lambda a, b: torch.nn.functional.silu(a) * b, (g, u), dh)),
           "swiglu_fused_ms": timer(lambda: step(_SiluMulFunction.apply, (g, u), dh)),
           "rope_hf_ms": timer(lambda: rope_step(apply_rotary_pos_emb)),
           "rope_fused_ms": timer(lambda: rope_step(fused_rope))}
    for key in ("rms_norm", "swiglu", "rope"):
        row[f"{key}_speedup"] = row[f"{key}_hf_ms"] / row[f"{key}_fused_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4096x4096,4096x11008,8192x8192", help="in x out, comma-separated")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--lowrank", default="8192,4096,64", help="tokens,out,r")
    parser.add_argument("--fused", default="16384,2048,5632", help="tokens,hidden,intermediate of the fused blocks")
    parser.add_argument("--mvue", default="16384x5632,16384x2048", help="tokens x out of mvue_compress, comma-separated")
    parser.add_argument("--skinny", default="8x2048x2560,8x2048x2048,8x2048x11264,8x5632x2048,16x4096x4096",
                        help="tokens x in x out of skinny_sparse_mm (llama-1b's decode products), comma-separated")
    parser.add_argument("--no-sweep", action="store_true", help="time the default tile configs only")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"which kernels to time, comma-separated, of {','.join(SECTIONS)}")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU through the Triton interpreter (checks the script, times nothing)")
    parser.add_argument("--out", default=None, help="result JSON (default bench/results/kernels_<gpu>.json)")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    tokens, lr_out, rank = (int(v) for v in args.lowrank.split(","))
    fused_shape = tuple(int(v) for v in args.fused.split(","))
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.dry_run:
        device, timer, sweep = "cpu", _wall_ms, not args.no_sweep
        shapes, (tokens, lr_out, rank), fused_shape = [(64, 48)], (32, 48, 8), (64, 64, 128)
        args.mvue, args.skinny = "64x64", "5x128x64"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench.kernels needs a CUDA GPU (or --dry-run to check the script on the CPU)")
        device, timer, sweep = "cuda", time_ms, not args.no_sweep

    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown --sections {sorted(unknown)}: choose from {','.join(SECTIONS)}")
    payload: dict = {}
    if "refresh" in sections:
        rows = []
        for in_f, out_f in shapes:
            row = {"in": in_f, "out": out_f, "dtype": args.dtype,
                   **bench_refresh(in_f, out_f, dtype, device, timer, sweep),
                   **bench_gather(in_f, out_f, dtype, device, timer)}
            print(f"transpose_values {in_f}x{out_f} {args.dtype}: kernel {row['refresh_kernel_ms']:.3f} ms "
                  f"({row['refresh_kernel_gbps']:.0f} GB/s) vs torch {row['refresh_torch_ms']:.3f} ms "
                  f"= {row['refresh_speedup']:.1f}x; best {row['refresh_best_config']} "
                  f"{row['refresh_best_gbps']:.0f} GB/s | full refresh {row['full_refresh_kernel_ms']:.3f} vs "
                  f"{row['full_refresh_torch_ms']:.3f} ms | mask kernel {row['mask_kernel_ms']:.3f} ms vs torch "
                  f"{row['mask_torch_ms']:.3f} ms = {row['mask_speedup']:.1f}x | dW gather {row['gather_kernel_ms']:.3f} "
                  f"vs {row['gather_torch_ms']:.3f} ms", flush=True)
            rows.append(row)
        payload["refresh"] = rows
    if "lowrank" in sections:
        lr = {"tokens": tokens, "out": lr_out, "r": rank, "dtype": args.dtype,
              **bench_lowrank(tokens, lr_out, rank, dtype, device, timer, sweep)}
        print(f"lowrank_addmm T={tokens} out={lr_out} r={rank} {args.dtype}: kernel {lr['kernel_ms']:.3f} ms "
              f"({lr['kernel_gbps']:.0f} GB/s) vs addmm {lr['torch_addmm_ms']:.3f} ms = {lr['speedup_vs_addmm']:.2f}x; "
              f"with bias {lr['kernel_bias_ms']:.3f} vs {lr['torch_addmm_bias_ms']:.3f} ms; best {lr['best_config']}; "
              f"max err kernel {lr['kernel_max_abs_err']:.3g} torch {lr['torch_max_abs_err']:.3g}", flush=True)
        payload["lowrank"] = lr
    if "mvue" in sections:
        mvue = []
        for shape in args.mvue.split(","):
            mvue.append({"dtype": args.dtype, **bench_mvue(*(int(v) for v in shape.split("x")), dtype, device, timer, sweep)})
            m = mvue[-1]
            print(f"mvue_compress {shape} {args.dtype}: {m['kernel_ms']:.3f} ms ({m['kernel_gbps']:.0f} GB/s) vs copy "
                  f"{m['copy_ms']:.3f} ms ({m['copy_gbps']:.0f} GB/s); best {m['best_config']} {m['best_ms']:.3f} ms "
                  f"({m['best_gbps']:.0f} GB/s)", flush=True)
        payload["mvue"] = mvue
    if "swiglu_mvue" in sections:
        sm = {"dtype": args.dtype, **bench_swiglu_mvue(fused_shape[0], fused_shape[2], dtype, device, timer, sweep)}
        print(f"mvue_compress_swiglu T={fused_shape[0]} I={fused_shape[2]} {args.dtype}: {sm['kernel_ms']:.3f} ms "
              f"({sm['kernel_gbps']:.0f} GB/s) vs silu_mul_backward + mvue_compress {sm['two_kernels_ms']:.3f} ms = "
              f"{sm['speedup']:.2f}x; best {sm['best_config']} {sm['best_ms']:.3f} ms", flush=True)
        payload["swiglu_mvue"] = sm
    if "skinny" in sections:
        skinny = []
        kernel_timer = functools.partial(timer, graph=True)  # microseconds of GPU work: the kernels alone
        for shape in args.skinny.split(","):
            skinny.append({"dtype": args.dtype,
                           **bench_skinny(*(int(v) for v in shape.split("x")), dtype, device, kernel_timer, sweep)})
            k = skinny[-1]
            print(f"skinny_sparse_mm {shape} {args.dtype}: {k['kernel_ms'] * 1e3:.1f} us ({k['kernel_gbps']:.0f} GB/s) vs "
                  f"dense {k['dense_ms'] * 1e3:.1f} us ({k['dense_gbps']:.0f} GB/s) = {k['speedup']:.2f}x; best "
                  f"{k['best_config']} {k['best_ms'] * 1e3:.1f} us = {k['best_speedup']:.2f}x", flush=True)
            if "mma_ms" in k:
                print(f"skinny_mma_sparse_mm {shape} {args.dtype}: {k['mma_ms'] * 1e3:.1f} us ({k['mma_gbps']:.0f} GB/s) "
                      f"= {k['mma_speedup']:.2f}x of dense; best {k['mma_best_config']} "
                      f"{k['mma_best_ms'] * 1e3:.1f} us", flush=True)
        payload["skinny"] = skinny
    if "fused" in sections:
        fused = {"dtype": args.dtype, **bench_fused(*fused_shape, dtype, device, timer)}
        print(f"fused fwd+bwd {fused_shape}: RMSNorm {fused['rms_norm_fused_ms']:.3f} vs HF {fused['rms_norm_hf_ms']:.3f} ms "
              f"= {fused['rms_norm_speedup']:.1f}x | SwiGLU gate {fused['swiglu_fused_ms']:.3f} vs "
              f"{fused['swiglu_hf_ms']:.3f} ms = {fused['swiglu_speedup']:.1f}x | RoPE {fused['rope_fused_ms']:.3f} vs "
              f"{fused['rope_hf_ms']:.3f} ms = {fused['rope_speedup']:.1f}x", flush=True)
        payload["fused"] = fused
    payload["defaults"] = {"refresh": refresh_mod.CONFIG, "mask": masks_mod.CONFIG, "lowrank": lowrank_mod.CONFIG,
                           "mvue": mvue_mod.CONFIG, "skinny": skinny_mod.CONFIG}
    if args.dry_run:
        print("dry run: nothing written")
        return
    write_result(args.out or f"bench/results/kernels_{gpu_tag()}.json", payload)


if __name__ == "__main__":
    main()
