"""One linear layer, dense vs SparseLinear (cuSPARSELt): fwd, dX, dW (exact, and MVUE as a sparse GEMM),
whole step (exact, and with ``mvue_dw``: MVUE where its plan does not fall back to the exact dW), memory.

Every ratio is dense time / sparse time from the same run on the same GPU. Times are
eager (what a training step pays, launch overhead included); the ``*_graph`` columns
replay CUDA graphs and so show the kernels alone (``step_graph``: the whole step captured, forward
and backward, so eager ``step`` minus it is what the host and any synchronization cost). The whole
step's backward runs on the calling thread, as dsparse's engine runs it (``"autograd": {"multithreading": false}``), for
dense and sparse alike; ``--autograd_threads`` hands it to torch's autograd thread (how runs
before session 17 measured it). Sparse rows come twice: with
cuSPARSELt's default plan (the exact dW unfused: cuBLAS, then a gather of the kept entries) and with
the tuned plans (``python -m bench.tune`` first; role ``dw`` may pick the fused Triton GEMM).

    python -m bench.layer --shapes 4096x4096,4096x11008 --tokens 8192 --dtypes fp16,bf16
"""
from __future__ import annotations

import argparse
from dataclasses import asdict

import torch
import torch.nn.functional as F

from bench.common import gpu_tag, time_ms, write_result
from bench.tune import DTYPES, parse_shapes
from dsparse import SparseLinear
from dsparse.backends import plans
from dsparse.backends.base import padded_tokens


def _bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _peak_step_mb(step) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _graph_ms(step) -> float | str:
    """The whole step replayed as one CUDA graph (its kernels alone), or why it could not be captured."""
    try:
        return time_ms(step, graph=True)
    except RuntimeError as e:  # recorded, not fatal: the eager columns stand without it
        torch.cuda.synchronize()
        return f"not captured: {str(e).splitlines()[0]}"


def bench_dense(in_f: int, out_f: int, tokens: int, dtype: torch.dtype) -> dict:
    w = torch.randn(out_f, in_f, device="cuda", dtype=dtype, requires_grad=True)
    x = torch.randn(tokens, in_f, device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, out_f, device="cuda", dtype=dtype)

    def step():
        F.linear(x, w).backward(dy)
        w.grad = x.grad = None

    return {
        "fwd": time_ms(lambda: F.linear(x, w)),
        "dx": time_ms(lambda: dy.mm(w)),
        "dw": time_ms(lambda: dy.t().mm(x)),
        "step": time_ms(step),
        "step_graph": _graph_ms(step),
        "fwd_graph": time_ms(lambda: F.linear(x, w), graph=True),
        "dx_graph": time_ms(lambda: dy.mm(w), graph=True),
        "weight_state_mb": _bytes(w, w) / 2**20,  # weight + its gradient
        "step_peak_mb": _peak_step_mb(step),
    }


def bench_sparse(in_f: int, out_f: int, tokens: int, dtype: torch.dtype) -> dict:
    layer = SparseLinear(in_f, out_f, bias=False, backend="cusparselt").to("cuda", dtype)
    x = torch.randn(tokens, in_f, device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, out_f, device="cuda", dtype=dtype)
    backend, ops = layer._operands()
    values = layer.values.detach()

    def step():
        layer(x).backward(dy)
        layer.values.grad = x.grad = None

    def step_mvue():
        layer.mvue_dw = True
        step()
        layer.mvue_dw = False

    return {
        "step_mvue": time_ms(step_mvue),
        "fwd": time_ms(lambda: backend.linear(ops, x, None)),
        "dx": time_ms(lambda: backend.grad_input(ops, dy)),
        "dw": time_ms(lambda: backend.grad_values(dy, x, layer.idx, 2, 4)),
        # the MVUE dW itself (step_mvue: what a layer with mvue_dw runs, the exact dW where its plan falls back)
        "dw_mvue": time_ms(lambda: backend.grad_values(dy, x, layer.idx, 2, 4, mvue_key=1)),
        "step": time_ms(step),
        "step_graph": _graph_ms(step),
        "fwd_graph": time_ms(lambda: backend.linear(ops, x, None), graph=True),
        "dx_graph": time_ms(lambda: backend.grad_input(ops, dy), graph=True),
        "refresh": time_ms(lambda: backend.refresh(ops, values, layer.idx, layer.keep_t, 2, 4)),
        "prepare": time_ms(lambda: backend.prepare(values, layer.idx, layer.keep_t, 2, 4), iters=5, inner=1),
        # values + gradient + masks + the two compressed operands
        "weight_state_mb": _bytes(layer.values, layer.values, layer.idx, layer.keep_t, ops.weight,
                                  ops.weight_t) / 2**20,
        "step_peak_mb": _peak_step_mb(step),
        # the exact dW's way: the fused Triton GEMM (and its tile) or cuBLAS + gather (the default plan)
        "dw_plan": asdict(plans.plan_for("dw", tokens, out_f, in_f, dtype)),
        # the MVUE dW's: its algorithm, and dense where the exact dW measured faster (step_mvue then runs that)
        "dw_mvue_plan": asdict(plans.plan_for("dw_mvue", padded_tokens(tokens), out_f, in_f, dtype)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096,8192x8192", help="in x out, comma-separated")
    parser.add_argument("--tokens", default="4096,8192,16384")
    parser.add_argument("--dtypes", default="fp16,bf16")
    parser.add_argument("--autograd_threads", action="store_true",
                        help="run the whole step's backward on torch's autograd thread (torch's default), not the "
                             "calling thread (dsparse's engine)")
    parser.add_argument("--out", default=None, help="result JSON (default bench/results/layer_<gpu>.json)")
    args = parser.parse_args()
    plans.load_default_plans()
    with torch.autograd.set_multithreading_enabled(args.autograd_threads):
        run(args)


def run(args: argparse.Namespace) -> None:
    """Every (shape, tokens, dtype) row, written after each one."""
    rows = []
    for in_f, out_f in parse_shapes(args.shapes):
        for tokens in [int(t) for t in args.tokens.split(",")]:
            for dname in args.dtypes.split(","):
                dtype = DTYPES[dname]
                row = {"in": in_f, "out": out_f, "tokens": tokens, "dtype": dname,
                       "dense": bench_dense(in_f, out_f, tokens, dtype)}
                with plans.default_plans_only():
                    row["sparse_default"] = bench_sparse(in_f, out_f, tokens, dtype)
                row["sparse_tuned"] = bench_sparse(in_f, out_f, tokens, dtype)
                for variant in ("sparse_default", "sparse_tuned"):
                    row[f"speedup_{variant}"] = {k: row["dense"][k] / row[variant][k]
                                                 for k in ("fwd", "dx", "dw", "step", "fwd_graph", "dx_graph")}
                    row[f"speedup_{variant}"]["dw_mvue"] = row["dense"]["dw"] / row[variant]["dw_mvue"]
                    row[f"speedup_{variant}"]["step_mvue"] = row["dense"]["step"] / row[variant]["step_mvue"]
                    if all(isinstance(r["step_graph"], float) for r in (row["dense"], row[variant])):
                        row[f"speedup_{variant}"]["step_graph"] = row["dense"]["step_graph"] / row[variant]["step_graph"]
                row["memory_ratio"] = row["sparse_tuned"]["weight_state_mb"] / row["dense"]["weight_state_mb"]
                s = row["speedup_sparse_tuned"]
                print(f"{in_f:5d}x{out_f:<5d} T={tokens:5d} {dname}: fwd {s['fwd']:.2f}x dx {s['dx']:.2f}x "
                      f"dw {s['dw']:.2f}x step {s['step']:.2f}x (default plan step "
                      f"{row['speedup_sparse_default']['step']:.2f}x) graph fwd {s['fwd_graph']:.2f}x "
                      f"dx {s['dx_graph']:.2f}x step {s.get('step_graph', float('nan')):.2f}x; MVUE dw "
                      f"{s['dw_mvue']:.2f}x step {s['step_mvue']:.2f}x", flush=True)
                rows.append(row)
                write_result(args.out or f"bench/results/layer_{gpu_tag()}.json",  # after every row
                             {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
