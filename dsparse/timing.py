"""GPU timing shared by the plan tuner and the benchmarks."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def time_ms(fn: Callable[[], Any], warmup: int = 3, iters: int = 15, inner: int = 5, graph: bool = False) -> float:
    """Median milliseconds per call of ``fn`` on the GPU.

    Each sample times ``inner`` back-to-back calls between two CUDA events, so launch
    latency overlaps as in a training loop, while host-bound code (slower to enqueue
    than the GPU runs it) still shows. ``graph=True`` replays a captured CUDA graph
    instead: the kernels alone.
    """
    if not torch.cuda.is_available():  # CPU: wall clock (dry runs of the GPU benchmarks)
        import time

        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(iters):
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - start) * 1e3 / inner)
        return sorted(samples)[len(samples) // 2]
    run = fn
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    times.sort()
    return times[len(times) // 2]
