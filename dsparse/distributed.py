"""Cross-rank agreement: every rank must hold the same N:M masks, and runs each product on the same plan.

Masks are deterministic functions of replicated values, so ranks agree by construction;
these helpers make that a checked fact (a cheap checksum all-reduce) and seed it at start
(rank 0's masks win, like DeepSpeed's broadcast of the parameters). Plans are chosen by timing,
which differs from rank to rank: :func:`agree_plans` hands every rank rank 0's.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from .backends import plans
from .nn import SparseLinear

logger = logging.getLogger(__name__)


def _ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_masks(layers: list[SparseLinear], src: int = 0) -> None:
    """Give every rank rank ``src``'s mask buffers."""
    if not _ready():
        return
    for layer in layers:
        for buf in (layer.idx, layer.keep_t):
            dist.broadcast(buf, src)
        layer.mark_values_changed()


def mask_checksum(layers: list[SparseLinear]) -> torch.Tensor:
    """Two int64 sums that change when any kept position or double-pruning choice changes."""
    total = torch.zeros(2, dtype=torch.int64, device=layers[0].idx.device if layers else "cpu")
    for i, layer in enumerate(layers, start=1):
        pos = torch.arange(layer.idx.numel(), device=layer.idx.device, dtype=torch.int64)
        total[0] += (layer.keep_t.view(-1).to(torch.int64) * (pos % 1_000_003 + i)).sum()
        total[1] += (layer.idx.view(-1).to(torch.int64) * (pos % 999_983 + i)).sum()
    return total


def check_mask_agreement(layers: list[SparseLinear], step: int) -> None:
    """Raise if ranks hold different masks (compares min and max of the checksum over ranks)."""
    if not _ready() or not layers:
        return
    local = mask_checksum(layers)
    lo, hi = local.clone(), local.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(
            f"ranks disagree on the sparse masks after optimizer step {step} (checksum {local.tolist()} on rank "
            f"{dist.get_rank()}, min {lo.tolist()}, max {hi.tolist()}): the replicated values differ across ranks. "
            "Check that every rank runs the same model, data-parallel setup and deterministic kernels.")


def agree_plans(src: int = 0) -> int:
    """Give every rank rank ``src``'s plan for every product any rank has looked one up for; returns how
    many. Ranks that tuned a shape on first use each timed it themselves, so they may have picked other
    cuSPARSELt algorithms, or MVUE on one rank and the exact weight gradient on another; after this they
    run alike (rank ``src`` tunes what only other ranks have seen). Ranks on different GPUs or cuSPARSELt
    versions keep their own plans (an algorithm id means another kernel there). Call it on every rank
    at the same point: it is two collectives."""
    if not _ready():
        return 0
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (plans.device_key(), plans.looked_up()))
    devices = {device for device, _ in gathered}
    if len(devices) > 1:
        logger.warning("dsparse: ranks run on different GPUs or cuSPARSELt versions (%s): each keeps its own "
                       "plans", ", ".join(sorted(devices)))
        return 0
    keys = sorted(set().union(*(keys for _, keys in gathered)))
    box = [plans.rows_for(keys) if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src)
    plans.ensure_loaded()  # a later first load must not overwrite what is installed now
    return plans.install_rows(box[0], f"rank {src}'s plans")
