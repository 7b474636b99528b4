"""Start real multi-process DeepSpeed runs from tests: the deepspeed launcher, mpiexec, or one process."""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remove_shm_buffers(port: int) -> None:
    """Delete the shared-memory allreduce buffers DeepSpeed's CPU backend leaves in /dev/shm (~69 MB per
    rank, never freed by DeepSpeed 0.19.8; named after the master port): a test suite would leak GBs of RAM."""
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        with contextlib.suppress(OSError):
            os.remove(path)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _bin(name: str) -> str:
    local = os.path.join(os.path.dirname(sys.executable), name)
    return local if os.path.exists(local) else (shutil.which(name) or name)


def start_single(script: str, args: list[str]) -> subprocess.Popen:
    """Start ``script`` as a one-rank job in the background (stdout and stderr piped)."""
    env = _env()
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return subprocess.Popen([sys.executable, script, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run(how: str, script: str, args: list[str], timeout: int = 600, ranks: int = 2) -> subprocess.CompletedProcess:
    """Run ``script`` with ``how`` in {"deepspeed", "mpiexec", "single", "bash"}; raise with the log on failure.

    ``"bash"`` runs a job script (``NP`` ranks through its own mpiexec).
    """
    env = _env()
    port = free_port()
    if how == "bash":
        env.update(NP=str(ranks), MASTER_PORT=str(port))
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
        cmd = ["bash", script, *args]
    elif how == "deepspeed":
        cmd = [_bin("deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port), script, *args]
    elif how == "mpiexec":
        env["MASTER_PORT"] = str(port)
        cmd = [_bin("mpiexec"), "-n", str(ranks), sys.executable, script, *args]
    else:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, script, *args]
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    finally:
        remove_shm_buffers(port)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc
