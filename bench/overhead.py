"""Host (CPU) time per call of one layer's products, dense vs SparseLinear, and where it goes.

At small token counts a training step is bound by how fast the host enqueues kernels, not by
the GPU: this is what the eager ``bench.layer`` ratios at 4096 tokens pay for. Each call is
timed twice over (:func:`host_and_gpu_us`): the host's cost of enqueueing it, and the GPU's
cost of running it. A cProfile of the sparse step says which Python functions the host's
time goes to. Triton launches are timed on their own too: through :class:`kernels._triton.DualKernel`'s
direct launch of the compiled kernel, and through Triton's ``JITFunction.run``.

    python -m bench.overhead                     # writes bench/results/overhead_<gpu>.json
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.common import gpu_tag, write_result
from bench.tune import DTYPES
from dsparse import SparseLinear
from dsparse.backends import plans


def host_and_gpu_us(fn: Callable[[], object], iters: int = 200) -> dict[str, float]:
    """Host and GPU microseconds per call of ``fn``, measured apart.

    The calls are enqueued behind a long GPU sleep, so the host never waits on the GPU:
    the wall time of enqueueing is the host's cost alone, and CUDA events around the calls
    time the GPU running them back to back. A ``host`` time near the sleep's length divided
    by ``iters`` (~2.5 ms) would mean the host did wait: ``fn`` synchronises with the GPU, or
    its launches filled CUDA's queue.
    """
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000_000)  # ~0.5 s of GPU cycles: longer than the enqueueing below
    start.record()
    began = time.perf_counter()
    for _ in range(iters):
        fn()
    enqueue = time.perf_counter() - began
    end.record()
    torch.cuda.synchronize()
    return {"host": enqueue * 1e6 / iters, "gpu": start.elapsed_time(end) * 1e3 / iters}


def _kernel_table(fn: Callable[[], object], label: str, calls: int = 20) -> list[str]:
    """torch.profiler's GPU kernels of ``calls`` calls of ``fn``: what the GPU runs, and for how long."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - start) * 1e3 / calls
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=70)
    return [f"{label}: {wall:.3f} ms per call under the profiler", *table.splitlines()]


def triton_launch_us(launch: Callable[[], object]) -> dict[str, dict[str, float]]:
    """Host and GPU time of the one Triton launch ``launch`` makes: through DualKernel's direct launch
    (what dsparse runs) and through ``JITFunction.run`` (Triton's own binding and cache lookup)."""
    from kernels._triton import capture_launches

    with capture_launches() as launches:
        launch()
    (kernel, grid, args, kwargs), = launches
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    return {"direct": host_and_gpu_us(lambda: kernel.launch(device, grid, *args, **kwargs)),
            "jit_run": host_and_gpu_us(lambda: kernel.jitted[grid](*args, **kwargs))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in_features", type=int, default=4096)
    parser.add_argument("--out_features", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--profile_tokens", type=int, default=4096, help="tokens of the GPU kernel profile")
    parser.add_argument("--out", default=None, help="result JSON (default bench/results/overhead_<gpu>.json)")
    args = parser.parse_args()
    # no on-the-spot tuning: at a few tokens it would pick dense GEMMs, and this measures the sparse path
    os.environ["DSPARSE_AUTOTUNE"] = "0"
    dtype = DTYPES[args.dtype]
    plans.load_default_plans()
    in_f, out_f, tokens = args.in_features, args.out_features, args.tokens
    x = torch.randn(tokens, in_f, device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, out_f, device="cuda", dtype=dtype)
    w = torch.randn(out_f, in_f, device="cuda", dtype=dtype, requires_grad=True)
    layer = SparseLinear(in_f, out_f, bias=False, backend="cusparselt").to("cuda", dtype)
    backend, ops = layer._operands()

    def dense_step():
        F.linear(x, w).backward(dy)
        w.grad = x.grad = None

    def sparse_step(x: torch.Tensor, dy: torch.Tensor) -> None:
        layer(x).backward(dy)
        layer.values.grad = x.grad = None

    def single_thread(fn: Callable[[], None]) -> Callable[[], None]:
        """``fn`` with its backward on this thread instead of autograd's device thread (dsparse's engine)."""
        def run() -> None:
            with torch.autograd.set_multithreading_enabled(False):
                fn()
        return run

    result = {
        "shape": {"in": in_f, "out": out_f, "tokens": tokens, "dtype": args.dtype},
        "dense_us": {"fwd": host_and_gpu_us(lambda: F.linear(x, w)), "dx": host_and_gpu_us(lambda: dy.mm(w)),
                     "dw": host_and_gpu_us(lambda: dy.t().mm(x)), "step": host_and_gpu_us(dense_step),
                     "step_single_thread": host_and_gpu_us(single_thread(dense_step))},
        "sparse_us": {"fwd": host_and_gpu_us(lambda: backend.linear(ops, x, None)),
                      "dx": host_and_gpu_us(lambda: backend.grad_input(ops, dy)),
                      "dw": host_and_gpu_us(lambda: backend.grad_values(dy, x, layer.idx, 2, 4)),
                      "operands": host_and_gpu_us(layer._operands),
                      "step": host_and_gpu_us(lambda: sparse_step(x, dy)),
                      "step_single_thread": host_and_gpu_us(single_thread(lambda: sparse_step(x, dy)))},
    }
    from kernels import gather_kept, mvue_compress

    dense_dw = dy.t().mm(x.detach())
    result["triton_launch_us"] = {
        "gather_kept": triton_launch_us(lambda: gather_kept(dense_dw, layer.idx, 2, 4)),
        "mvue_compress": triton_launch_us(lambda: mvue_compress(dy, 1, tokens))}
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(200):
        sparse_step(x, dy)
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    result["sparse_step_profile_200_calls"] = text.getvalue().splitlines()
    result["gpu_kernels_sparse_step_small"] = _kernel_table(lambda: sparse_step(x, dy),
                                                            f"sparse step, {args.tokens} tokens")
    tokens = args.profile_tokens
    x_big = torch.randn(tokens, in_f, device="cuda", dtype=dtype, requires_grad=True)
    dy_big = torch.randn(tokens, out_f, device="cuda", dtype=dtype)
    result["gpu_kernels_sparse_step"] = _kernel_table(lambda: sparse_step(x_big, dy_big),
                                                      f"sparse step, {tokens} tokens")
    result["gpu_kernels_mvue_dw"] = _kernel_table(lambda: backend.grad_values(dy_big, x_big, layer.idx, 2, 4, mvue_key=1),
                                                  f"MVUE weight gradient, {tokens} tokens")
    print({k: v for k, v in result.items() if k.endswith("_us")})
    print("\n".join(result["gpu_kernels_mvue_dw"]))
    print(text.getvalue())
    write_result(args.out or f"bench/results/overhead_{gpu_tag()}.json", result)


if __name__ == "__main__":
    main()
