"""How a rank's process ends: at once, once every rank is done, without Python's finalization.

DeepSpeed keeps its process groups alive past ``torch.distributed.destroy_process_group`` (ZeRO-3
parameters hold theirs in ``ds_process_group``), so gloo's worker threads outlive ``main``. When
one of them drops the last reference to a collective's tensor while the interpreter finalizes,
it needs the GIL, is stopped by Python, and takes the process down with SIGABRT ("terminate
called without an active exception", the faulthandler dump showing a finalizing main thread
with no Python frame): 2 of ~155 two-rank ZeRO-3 CPU runs of the test worker here, and a CI run.
Ending with ``os._exit`` after a barrier leaves no finalization to race; every file a run
writes (checkpoints, metrics, TensorBoard events) is closed and flushed before.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

import torch.distributed as dist


def end_process(code: int = 0) -> NoReturn:
    """Wait for the other ranks (when the default process group is up), flush stdout, stderr and
    logging, and exit with ``code`` without running the interpreter's finalization."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    logging.shutdown()
    os._exit(code)
