"""Ship per-shape plans: tune the products of every linear shape (forward, input gradient, the
exact weight gradient and the MVUE one) and save the winners.

The measurement itself is :func:`dsparse.backends.tuning.tune_product` (every cuSPARSELt
algorithm and result layout, run as dsparse runs them and checked against algorithm 0,
dsparse's few-token kernel up to 64 tokens, and the dense GEMM; for the exact weight gradient
:func:`~dsparse.backends.tuning.tune_weight_grad`); here the finalists are
timed as CUDA graphs (kernels alone), or with ``--timing eager`` as they run eagerly, host
time included (decoding is host-bound). After
every product all plans (merged into the existing file) go to a JSON file keyed by GPU and
versions, which :func:`dsparse.backends.plans.load_plans` reads back; ``gpu_session.sh``
writes it into ``dsparse/backends/tuned/``. The full table of timings goes to
``bench/results/tune_<gpu>.json``.

    python -m bench.tune --shapes 4096x4096,4096x11008 --tokens 8192 --dtypes bf16
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from bench.common import gpu_tag, write_result
from dsparse.backends import plans
from dsparse.backends.plans import Plan
from dsparse.backends.tuning import tune_mvue_dw, tune_product, tune_weight_grad

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"4096x11008,..."`` -> ``[(in, out), ...]``."""
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]


ROLES = ("fwd", "dx", "dw", "dw_mvue")


def tune(shapes: list[tuple[int, int]], tokens_list: list[int], dtypes: list[str], path: str,
         roles: tuple[str, ...] = ROLES, graph: bool = True) -> list[dict]:
    """Tune the ``roles`` products of every linear shape; installs the winning plans and saves them to ``path``.
    ``graph``: time the finalists' kernels alone (CUDA graphs); else eagerly, host time included."""
    table = []
    for in_f, out_f in shapes:
        for tokens in tokens_list:
            for dname in dtypes:
                dtype = DTYPES[dname]
                # forward: W (out, in) @ Xᵀ ; input gradient: W̃ᵀ (in, out) @ dYᵀ ; dW: dYᵀ (out, T) @ X at the
                # kept entries ; MVUE dW: S(dYᵀ) (out, T) @ X
                for role, rows, k in (("fwd", out_f, in_f), ("dx", in_f, out_f), ("dw", in_f, out_f),
                                      ("dw_mvue", in_f, out_f)):
                    if role not in roles:
                        continue
                    start = time.perf_counter()
                    weight_grad = {"dw": tune_weight_grad, "dw_mvue": tune_mvue_dw}.get(role)
                    plan, timings = (weight_grad(k, rows, tokens, dtype, graph=graph) if weight_grad
                                     else tune_product(rows, k, tokens, dtype, graph=graph))
                    plans.set_plan(role, tokens, k, rows, dtype, plan)
                    plans.save_plans(path)
                    default = next(t.get("ms", float("nan")) for t in timings if Plan.from_row(t) == plans.DEFAULT_PLAN)
                    dense, skinny, mma = (next((t["ms"] for t in timings if picked(t) and "ms" in t), float("nan"))
                                          for picked in (lambda t: t["dense"], lambda t: t["skinny"] and not t["mma"],
                                                         lambda t: t["mma"]))
                    best = min(t["ms"] for t in timings if "ms" in t)
                    table.append({"role": role, "tokens": tokens, "k": k, "n": rows, "dtype": dname,
                                  "plan": vars(plan), "default_ms": default, "dense_ms": dense, "skinny_ms": skinny, "mma_ms": mma,
                                  "best_ms": best, "timings": timings})
                    print(f"{role:3s} T={tokens:6d} k={k:6d} n={rows:6d} {dname}: default {default:.3f} ms, dense "
                          f"{dense:.3f} ms, skinny {skinny:.3f} ms (sparse tensor cores {mma:.3f}), best {best:.3f} ms with {plan} (kernels; "
                          f"{time.perf_counter() - start:.1f} s)", flush=True)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096,8192x8192", help="in x out, comma-separated")
    parser.add_argument("--tokens", default="4096,8192,16384", help="token counts, comma-separated")
    parser.add_argument("--dtypes", default="bf16,fp16", help="bf16 and/or fp16")
    parser.add_argument("--roles", default=",".join(ROLES), help="products to tune: fwd, dx, dw and/or dw_mvue")
    parser.add_argument("--timing", choices=["graph", "eager"], default="graph",
                        help="graph: the finalists' kernels alone; eager: with their host time (what a host-bound "
                             "decoding step pays)")
    parser.add_argument("--plans", default=None, help="plan cache to write (default: dsparse's per-GPU cache path)")
    parser.add_argument("--out", default=None, help="timings JSON (default bench/results/tune_<gpu>.json)")
    args = parser.parse_args()
    roles = tuple(args.roles.split(","))
    if set(roles) - set(ROLES):
        parser.error(f"--roles: unknown {sorted(set(roles) - set(ROLES))}; choose from {', '.join(ROLES)}")
    if set(args.dtypes.split(",")) - set(DTYPES):
        parser.error(f"--dtypes: unknown {sorted(set(args.dtypes.split(',')) - set(DTYPES))}; choose from "
                     f"{', '.join(DTYPES)}")
    path = args.plans or plans.default_cache_path()
    if os.path.exists(path):  # keep the plans of shapes not tuned in this run
        plans.load_plans(path)
    table = tune(parse_shapes(args.shapes), [int(t) for t in args.tokens.split(",")], args.dtypes.split(","), path,
                 roles, graph=args.timing == "graph")
    print(f"saved {path}")
    write_result(args.out or f"bench/results/tune_{gpu_tag()}.json", {"products": table})


if __name__ == "__main__":
    main()
