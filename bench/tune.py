"""Choose, per GEMM shape, the fastest cuSPARSELt algorithm and result layout; cache the plans.

For each product (role fwd or dx, tokens, k, n, dtype) the algorithms are run as dsparse
runs them (``_sparse_mm``: the cached-plan binding where it works, the transpose copy for
untransposed results), each checked against algorithm 0's result. A short eager screen
times every algorithm id cuSPARSELt offers for both result layouts with the result
written transposed, and the fastest few and algorithm 0 untransposed (on an H100 that
layout was never within 30% of the best, and each new plan costs up to ~0.15 s of plan
set-up); the few near the best and the default (algorithm 0, untransposed) are then
timed again as CUDA graphs (kernels only). The winner is installed with
:func:`dsparse.backends.plans.set_plan`; after every product all plans (merged into the
existing file) go to a JSON file keyed by GPU and versions, which
:func:`dsparse.backends.plans.load_plans` reads back. The full table of timings goes to
``bench/results/tune_<gpu>.json``.

    python -m bench.tune --shapes 4096x4096,4096x11008 --tokens 8192 --dtypes bf16
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from bench.common import gpu_tag, time_ms, write_result
from dsparse import nm
from dsparse.backends import cslt_binding, plans
from dsparse.backends.cusparselt import _compress_slots, _sparse_mm

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SCREEN = {"warmup": 0, "iters": 3, "inner": 1}  # every candidate, eager, after a first call checked its result
FINAL = {"warmup": 2, "iters": 7, "inner": 5, "graph": True}  # the finalists
FINALISTS, NEAR = 4, 1.10  # re-time up to this many screened candidates within 10% of the fastest
UNTRANSPOSED = 4  # the untransposed layout is screened for algorithm 0 and this many fastest transposed ones


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"4096x11008,..."`` -> ``[(in, out), ...]``."""
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]


def alg_count(packed: torch.Tensor, x: torch.Tensor) -> int:
    """How many algorithm ids to try: the fewer cuSPARSELt offers of the two result layouts
    (it offers fp16 ids with a transposed result that crash: see ``cslt_binding.alg_count``)."""
    if cslt_binding.available(x.dtype, x.device):
        return min(cslt_binding.alg_count(packed.shape[0], x.shape[1], x.shape[0], x.dtype, transpose)
                   for transpose in (False, True))
    return int(torch._C._cusparselt.mm_search(packed, x.t(), None, None, None, False)[3])


def tune_product(rows: int, k: int, tokens: int, dtype: torch.dtype) -> tuple[plans.Plan, list[dict]]:
    """Time every (alg_id, layout) of ``A (rows, k) 2:4 @ Xᵀ`` with ``X (tokens, k)``: screen, then finalists."""
    w = torch.randn(rows, k, device="cuda", dtype=dtype)
    idx = nm.kept_positions(nm.nm_mask(w.abs().float(), 2, 4), 2, 4)
    packed = _compress_slots(nm.gather_kept(w, idx, 4), idx)
    x = torch.randn(tokens, k, device="cuda", dtype=dtype)

    def timed(alg: int, transpose: bool, reps: dict) -> float:
        plan = plans.Plan(alg, transpose)
        return time_ms(lambda: _sparse_mm(packed, x, None, plan), **reps)

    want = _sparse_mm(packed, x, None, plans.Plan(0, False)).float()
    rows_out = []

    def screen(alg: int, transpose: bool) -> None:
        row = {"alg_id": alg, "transpose_result": transpose}
        try:
            got = _sparse_mm(packed, x, None, plans.Plan(alg, transpose)).float()
            err = ((got - want).norm() / want.norm()).item()
            if err > 1e-2:
                row["error"] = f"wrong result: relative error {err:.2g} from algorithm 0"
            else:
                row["screen_ms"] = timed(alg, transpose, SCREEN)
        except RuntimeError as e:  # an algorithm this shape does not support
            row["error"] = str(e).splitlines()[0]
        rows_out.append(row)

    for alg in range(alg_count(packed, x)):
        screen(alg, True)
    fastest = sorted((r for r in rows_out if "screen_ms" in r), key=lambda r: r["screen_ms"])[:UNTRANSPOSED]
    for alg in sorted({0, *(r["alg_id"] for r in fastest)}):
        screen(alg, False)
    screened = sorted((r for r in rows_out if "screen_ms" in r), key=lambda r: r["screen_ms"])
    finalists = [r for r in screened[:FINALISTS] if r["screen_ms"] <= NEAR * screened[0]["screen_ms"]]
    default = next(r for r in rows_out if r["alg_id"] == 0 and not r["transpose_result"])
    if "screen_ms" in default and default not in finalists:  # always timed, to compare
        finalists.append(default)
    for r in finalists:
        r["ms"] = timed(r["alg_id"], r["transpose_result"], FINAL)
    best = min((r for r in rows_out if "ms" in r), key=lambda r: r["ms"])
    return plans.Plan(best["alg_id"], best["transpose_result"]), rows_out


def tune(shapes: list[tuple[int, int]], tokens_list: list[int], dtypes: list[str], path: str) -> list[dict]:
    """Tune both sparse products of every linear shape; installs the winning plans and saves them to ``path``."""
    table = []
    for in_f, out_f in shapes:
        for tokens in tokens_list:
            for dname in dtypes:
                dtype = DTYPES[dname]
                # forward: W (out, in) @ Xᵀ ; input gradient: W̃ᵀ (in, out) @ dYᵀ
                for role, rows, k in (("fwd", out_f, in_f), ("dx", in_f, out_f)):
                    start = time.perf_counter()
                    plan, timings = tune_product(rows, k, tokens, dtype)
                    plans.set_plan(role, tokens, k, rows, dtype, plan)
                    plans.save_plans(path)
                    default = next(t.get("ms", float("nan")) for t in timings
                                   if t["alg_id"] == 0 and not t["transpose_result"])
                    best = min(t["ms"] for t in timings if "ms" in t)
                    table.append({"role": role, "tokens": tokens, "k": k, "n": rows, "dtype": dname,
                                  "plan": vars(plan), "default_ms": default, "best_ms": best, "timings": timings})
                    print(f"{role:3s} T={tokens:6d} k={k:6d} n={rows:6d} {dname}: default {default:.3f} ms, best "
                          f"{best:.3f} ms with {plan} (kernels; {time.perf_counter() - start:.1f} s)", flush=True)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096,8192x8192", help="in x out, comma-separated")
    parser.add_argument("--tokens", default="4096,8192,16384", help="token counts, comma-separated")
    parser.add_argument("--dtypes", default="bf16,fp16", help="bf16 and/or fp16")
    parser.add_argument("--plans", default=None, help="plan cache to write (default: dsparse's per-GPU cache path)")
    args = parser.parse_args()
    path = args.plans or plans.default_cache_path()
    if os.path.exists(path):  # keep the plans of shapes not tuned in this run
        plans.load_plans(path)
    table = tune(parse_shapes(args.shapes), [int(t) for t in args.tokens.split(",")], args.dtypes.split(","), path)
    print(f"saved {path}")
    write_result(f"bench/results/tune_{gpu_tag()}.json", {"products": table})


if __name__ == "__main__":
    main()
