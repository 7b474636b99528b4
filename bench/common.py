"""Shared pieces of the GPU benchmarks: device/version record, timing, JSON output."""
from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

import torch


def environment() -> dict[str, Any]:
    """What a result was measured with: command, GPU, and library versions."""
    env: dict[str, Any] = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpus=torch.cuda.device_count(), cuda=torch.version.cuda,
                   sm=f"{props.major}.{props.minor}")
        cslt = getattr(torch.backends, "cusparselt", None)
        env["cusparselt"] = cslt.version() if cslt is not None and cslt.is_available() else None
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    return env


def gpu_tag() -> str:
    """Short GPU name for result file names, e.g. ``h100``."""
    name = torch.cuda.get_device_name(0).lower() if torch.cuda.is_available() else "cpu"
    for tag in ("h100", "h200", "a100", "l40", "b200"):
        if tag in name:
            return tag
    return name.replace(" ", "_")


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


def write_result(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` (plus the environment) as JSON, atomically."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    payload = {"environment": environment(), **payload}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path}")
