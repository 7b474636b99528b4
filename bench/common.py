"""Shared pieces of the GPU benchmarks: device/version record, timing, JSON output."""
from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any

import torch

from dsparse.timing import time_ms  # noqa: F401  (the benchmarks time with it)


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


def write_result(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` (plus the environment) as JSON, atomically."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    payload = {"environment": environment(), **payload}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path}")
