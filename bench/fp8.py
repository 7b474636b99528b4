"""FP8 (e4m3) 2:4 on Hopper: how far the FP8 lever goes, product by product, before any training uses it.

For each shape it times ``Y = X Wᵀ`` five ways, all from the same run on the same GPU:
dense bf16 (cuBLAS), 2:4 bf16 (cuSPARSELt, best algorithm), dense FP8 (``torch._scaled_mm``),
2:4 FP8 (``torch._cslt_sparse_mm`` with e4m3 operands and a bf16 result; raw, and with the
per-tensor scales as its one-element alpha), and 2:4 FP8 plus the per-call cast of ``X`` to
e4m3 with a per-tensor scale (what a training step would pay for
activations; the weight is cast once per optimizer step). Results are checked against the bf16
product first. Ratios are dense bf16 time / time. Both 2:4 columns go through torch's
``_cslt_sparse_mm`` (the only path with e4m3 operands), so they compare with each other;
dsparse's own bf16 products (cached plans, ``bench.layer``) are faster at small shapes.

    python -m bench.fp8                           # writes bench/results/fp8_<gpu>.json
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.common import gpu_tag, time_ms, write_result
from bench.tune import parse_shapes
from dsparse import nm

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max


def to_e4m3(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` cast to e4m3 with one per-tensor scale (amax to the format's max); returns (fp8, inverse scale)."""
    scale = E4M3_MAX / t.abs().amax().float().clamp(min=1e-12)
    return (t.float() * scale).to(E4M3), scale.reciprocal()


def best_sparse_ms(packed: torch.Tensor, x: torch.Tensor, budget_ms: float, **kwargs) -> tuple[float, int, bool]:
    """Fastest cuSPARSELt algorithm and result layout for ``packed @ xᵀ``: (ms, alg_id, transpose_result).

    A candidate slower than ``budget_ms`` in a short trial is not timed further."""
    best, errors = (float("inf"), -1, False), []
    for transpose in (True, False):
        for alg in range(32):
            def call():
                return torch._cslt_sparse_mm(packed, x.t(), transpose_result=transpose, alg_id=alg, **kwargs)

            try:
                call()
                torch.cuda.synchronize()
            except RuntimeError as e:  # past the last algorithm id, or a layout this dtype lacks
                errors.append(f"transpose_result={transpose} alg {alg}: {str(e).splitlines()[0]}")
                break
            if time_ms(call, warmup=1, iters=3, inner=1) > budget_ms:
                continue
            best = min(best, (time_ms(call), alg, transpose))
    if best[1] < 0:
        raise RuntimeError(f"no cuSPARSELt algorithm ran {packed.dtype} within {budget_ms:.2f} ms: {errors}")
    return best


def bench_shape(in_f: int, out_f: int, tokens: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    dense_w = torch.randn(out_f, in_f, generator=gen, device="cuda") / in_f**0.5
    idx = nm.kept_positions(nm.nm_mask(dense_w.abs(), 2, 4), 2, 4)
    w = nm.dense_from_kept(nm.gather_kept(dense_w, idx, 4), idx, 2, 4)  # 2:4 along in
    x = torch.randn(tokens, in_f, generator=gen, device="cuda")
    w16, x16 = w.bfloat16(), x.bfloat16()
    w8, w_inv = to_e4m3(w)
    x8, x_inv = to_e4m3(x)
    # cuSPARSELt 0.8 has no per-row alpha vector for e4m3 ("operation not supported"), and torch reads a
    # one-element alpha back to the host at every call: the raw product is timed without alpha (the
    # per-tensor scales folded elsewhere), and once more with the one-element alpha
    alpha = (w_inv * x_inv).reshape(1)
    packed16, packed8 = torch._cslt_compress(w16), torch._cslt_compress(w8)

    dense_ms = time_ms(lambda: F.linear(x16, w16))
    sparse16_ms, alg16, _ = best_sparse_ms(packed16, x16, 5 * dense_ms)
    sparse8_ms, alg8, t8 = best_sparse_ms(packed8, x8, 5 * dense_ms, out_dtype=torch.bfloat16)
    scaled8_ms = time_ms(lambda: torch._cslt_sparse_mm(packed8, x8.t(), alpha=alpha, out_dtype=torch.bfloat16,
                                                       transpose_result=t8, alg_id=alg8))
    want = F.linear(x16, w16).float()
    got8 = torch._cslt_sparse_mm(packed8, x8.t(), alpha=alpha, out_dtype=torch.bfloat16, transpose_result=t8)
    dense8 = torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=torch.bfloat16)
    err = {name: ((got.float() - want).norm() / want.norm()).item() for name, got in
           (("sparse_fp8", got8 if t8 else got8.t()), ("dense_fp8", dense8))}
    dense8_ms = time_ms(lambda: torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=torch.bfloat16))

    def cast_and_sparse8():
        xq, xi = to_e4m3(x16)
        return torch._cslt_sparse_mm(packed8, xq.t(), alpha=(w_inv * xi).reshape(1), out_dtype=torch.bfloat16,
                                     transpose_result=t8, alg_id=alg8)

    with_cast_ms = time_ms(cast_and_sparse8)
    ms = {"dense_bf16": dense_ms, "sparse_bf16": sparse16_ms, "dense_fp8": dense8_ms, "sparse_fp8": sparse8_ms,
          "sparse_fp8_scaled": scaled8_ms, "sparse_fp8_with_cast": with_cast_ms}
    return {"in": in_f, "out": out_f, "tokens": tokens, "ms": ms, "alg_id": {"sparse_bf16": alg16, "sparse_fp8": alg8},
            "sparse_fp8_transpose_result": t8,
            "speedup_vs_dense_bf16": {k: dense_ms / v for k, v in ms.items() if k != "dense_bf16"},
            "relative_error_vs_bf16": err}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096,8192x8192", help="in x out, comma-separated")
    parser.add_argument("--tokens", default="8192")
    parser.add_argument("--out", default=None, help="result JSON (default bench/results/fp8_<gpu>.json)")
    args = parser.parse_args()
    rows = []
    for in_f, out_f in parse_shapes(args.shapes):
        for tokens in [int(t) for t in args.tokens.split(",")]:
            row = bench_shape(in_f, out_f, tokens)
            s = row["speedup_vs_dense_bf16"]
            print(f"{in_f:5d}x{out_f:<5d} T={tokens:5d}: 2:4 bf16 {s['sparse_bf16']:.2f}x, dense fp8 "
                  f"{s['dense_fp8']:.2f}x, 2:4 fp8 {s['sparse_fp8']:.2f}x ({s['sparse_fp8_with_cast']:.2f}x with the "
                  f"cast of X); error vs bf16 {row['relative_error_vs_bf16']}", flush=True)
            rows.append(row)
            write_result(args.out or f"bench/results/fp8_{gpu_tag()}.json", {"rows": rows})


if __name__ == "__main__":
    main()
