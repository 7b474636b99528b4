"""Choose, per GEMM shape, the fastest cuSPARSELt algorithm and result layout; cache the plans.

For each product (role fwd or dx, tokens, k, n, dtype) every algorithm id cuSPARSELt
offers is timed with both result layouts (kernels only, replayed as CUDA graphs); the
winner is installed with :func:`dsparse.backends.plans.set_plan` and all plans go to a
JSON file keyed by GPU and versions, which :func:`dsparse.backends.plans.load_plans`
reads back. The full table of timings goes to ``bench/results/tune_<gpu>.json``.

    python -m bench.tune --shapes 4096x4096,4096x11008 --tokens 8192 --dtypes bf16
"""
from __future__ import annotations

import argparse

import torch

from bench.common import gpu_tag, time_ms, write_result
from dsparse import nm
from dsparse.backends import plans
from dsparse.backends.cusparselt import _compress_slots

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"4096x11008,..."`` -> ``[(in, out), ...]``."""
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]


def max_alg_id(packed: torch.Tensor, dense_t: torch.Tensor) -> int:
    return int(torch._C._cusparselt.mm_search(packed, dense_t, None, None, None, False)[3])


def tune_product(rows: int, k: int, tokens: int, dtype: torch.dtype) -> tuple[plans.Plan, list[dict]]:
    """Time every (alg_id, layout) of ``A (rows, k) 2:4 @ Xᵀ`` with ``X (tokens, k)``."""
    w = torch.randn(rows, k, device="cuda", dtype=dtype)
    idx = nm.kept_positions(nm.nm_mask(w.abs().float(), 2, 4), 2, 4)
    packed = _compress_slots(nm.gather_kept(w, idx, 4), idx)
    x = torch.randn(tokens, k, device="cuda", dtype=dtype)
    rows_out = []
    for alg in range(max_alg_id(packed, x.t()) + 1):
        for transpose in (False, True):
            def run(alg=alg, transpose=transpose):
                out = torch._cslt_sparse_mm(packed, x.t(), transpose_result=transpose, alg_id=alg)
                return out if transpose else out.t().contiguous()
            try:
                ms = time_ms(run, warmup=2, iters=5, inner=3, graph=True)
            except RuntimeError as e:  # an algorithm this shape does not support
                rows_out.append({"alg_id": alg, "transpose_result": transpose, "error": str(e).splitlines()[0]})
                continue
            rows_out.append({"alg_id": alg, "transpose_result": transpose, "ms": ms})
    timed = [r for r in rows_out if "ms" in r]
    best = min(timed, key=lambda r: r["ms"])
    return plans.Plan(best["alg_id"], best["transpose_result"]), rows_out


def tune(shapes: list[tuple[int, int]], tokens_list: list[int], dtypes: list[str]) -> list[dict]:
    """Tune both sparse products of every linear shape; installs the winning plans."""
    table = []
    for in_f, out_f in shapes:
        for tokens in tokens_list:
            for dname in dtypes:
                dtype = DTYPES[dname]
                # forward: W (out, in) @ Xᵀ ; input gradient: W̃ᵀ (in, out) @ dYᵀ
                for role, rows, k in (("fwd", out_f, in_f), ("dx", in_f, out_f)):
                    plan, timings = tune_product(rows, k, tokens, dtype)
                    plans.set_plan(role, tokens, k, rows, dtype, plan)
                    default = next(t["ms"] for t in timings if t["alg_id"] == 0 and not t["transpose_result"])
                    best = min(t["ms"] for t in timings if "ms" in t)
                    table.append({"role": role, "tokens": tokens, "k": k, "n": rows, "dtype": dname,
                                  "plan": vars(plan), "default_ms": default, "best_ms": best, "timings": timings})
                    print(f"{role:3s} T={tokens:6d} k={k:6d} n={rows:6d} {dname}: default {default:.3f} ms, "
                          f"best {best:.3f} ms with {plan}", flush=True)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096,8192x8192", help="in x out, comma-separated")
    parser.add_argument("--tokens", default="4096,8192,16384", help="token counts, comma-separated")
    parser.add_argument("--dtypes", default="bf16,fp16", help="bf16 and/or fp16")
    parser.add_argument("--plans", default=None, help="plan cache to write (default: dsparse's per-GPU cache path)")
    args = parser.parse_args()
    table = tune(parse_shapes(args.shapes), [int(t) for t in args.tokens.split(",")], args.dtypes.split(","))
    path = args.plans or plans.default_cache_path()
    plans.save_plans(path)
    print(f"saved {path}")
    write_result(f"bench/results/tune_{gpu_tag()}.json", {"products": table})


if __name__ == "__main__":
    main()
