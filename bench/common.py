"""Shared pieces of the GPU benchmarks: device/version record, timing, JSON output."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from typing import Any

import torch

from dsparse.timing import time_ms  # noqa: F401  (the benchmarks time with it)


def environment() -> dict[str, Any]:
    """What a result was measured with and when: command, UTC time, GPU, and library versions."""
    env: dict[str, Any] = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
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


def write_result(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` (plus the environment) as JSON, atomically."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    payload = {"environment": environment(), **payload}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path}")


# GPU kernel categories of a training step, matched in order on the kernel's name (first match wins)
KERNEL_CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("sparse GEMM (cuSPARSELt)", ("sparse_gemm", "cusparselt", "cask_")),
    ("dense GEMM", ("nvjet", "gemm", "cutlass", "xmma", "cublas")),
    ("attention", ("sdpa", "flash", "fmha", "attention", "compute_dot_do_o")),
    ("adapter add (Triton)", ("_lowrank",)),
    ("dsparse Triton", ("_gather_kept_kernel", "_transpose_values_kernel", "_transpose_keep_kernel",
                        "_mvue_transpose_kernel")),
    ("fused RMSNorm / SwiGLU (Triton)", ("_rms_norm_", "_silu_mul_")),
    ("fused RoPE (Triton)", ("_rope_kernel",)),
    ("optimizer (multi-tensor)", ("multi_tensor_apply",)),
    ("copies", ("Memcpy", "direct_copy", "CatArrayBatchedCopy", "Memset")),
    ("softmax / loss", ("SoftMax", "nll_loss", "cross_entropy", "log_softmax")),
    ("reductions", ("reduce_kernel",)),
    ("elementwise", ("elementwise_kernel",)),
]


def category_order(runs: list[dict[str, Any]]) -> list[str]:
    """The kernel categories present in ``runs``' profiles, in :data:`KERNEL_CATEGORIES` order, then "other"."""
    present = {c for run in runs for c in run["gpu_profile"]["by_category_ms"]}
    return [c for c in [name for name, _ in KERNEL_CATEGORIES] + ["other"] if c in present]


def kernel_breakdown(prof: Any, steps: int, top: int = 25) -> dict[str, Any]:
    """GPU milliseconds per step of a ``torch.profiler`` run of ``steps`` steps, by kernel category.

    Only device kernels and memcpy/memset count (host-side ``aten::`` rows are skipped), so the
    categories add up to the GPU's busy time.
    """
    from torch.autograd import DeviceType

    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    categories: dict[str, float] = {}
    for event in kernels:
        name = event.key
        label = next((cat for cat, keys in KERNEL_CATEGORIES if any(k in name for k in keys)), "other")
        categories[label] = categories.get(label, 0.0) + event.self_device_time_total / 1e3 / steps
    ranked = sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]
    return {"gpu_busy_ms": sum(categories.values()),
            "by_category_ms": dict(sorted(categories.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"name": e.key[:120], "ms": e.self_device_time_total / 1e3 / steps,
                             "calls": e.count / steps} for e in ranked],
            **idle_gaps([(e.start_ns(), e.end_ns(), e.name()) for e in prof.profiler.kineto_results.events()
                         if e.device_type() == DeviceType.CUDA and e.duration_ns() > 0], steps)}


def host_profile(step: Any, steps: int, top: int = 40) -> dict[str, Any]:
    """Where the host's time goes: ``steps`` calls of ``step`` under cProfile (after the timing, which it
    would slow), the ``top`` functions by own time, in ms per step (own and cumulative) and calls per step."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    profiler.disable()
    rows = sorted(pstats.Stats(profiler).stats.items(), key=lambda item: -item[1][2])[:top]
    return {"steps": steps, "functions": [
        {"function": f"{os.path.basename(file)}:{line}({name})", "calls": calls / steps,
         "own_ms": 1e3 * own / steps, "cumulative_ms": 1e3 * cumulative / steps}
        for (file, line, name), (_, calls, own, cumulative, _) in rows]}


def idle_gaps(spans: list[tuple[int, int, str]], steps: int, top: int = 12, min_us: float = 5.0) -> dict[str, Any]:
    """Where the GPU sits idle between the first and last of ``spans`` (start ns, end ns, kernel name):
    the idle milliseconds per step, and the gaps of at least ``min_us`` grouped by the kernel that ends
    before them and the one that starts after (all streams merged, so overlapping kernels count once)."""
    spans = sorted(spans)
    if not spans:
        return {}
    idle_ns, groups = 0, {}
    _, last_end, last_name = spans[0]
    for start, end, name in spans[1:]:
        if start > last_end:
            gap = start - last_end
            idle_ns += gap
            if gap >= min_us * 1e3:
                key = (last_name[:80], name[:80])
                total, count = groups.get(key, (0, 0))
                groups[key] = (total + gap, count + 1)
        if end > last_end:
            last_end, last_name = end, name
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return {"span_ms": (last_end - spans[0][0]) / 1e6 / steps, "idle_ms": idle_ns / 1e6 / steps,
            "idle_gaps": [{"after": a, "before": b, "ms": t / 1e6 / steps, "count": c / steps}
                          for (a, b), (t, c) in ranked]}
