"""Advance sparse layers' mask schedules after any ``torch.optim`` step.

A global post-step hook lets a plain ``torch.optim.AdamW(model.parameters())`` drive the
W̃ᵀ mask schedule with no extra user call. Layers owned by a dsparse DeepSpeed engine
are skipped: there the engine counts steps, since DeepSpeed's inner optimizer steps on
flat fp32 copies (or skips on overflow) and only the engine knows when a step applied.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_handle = None


def tag_owner(param: torch.Tensor, layer: torch.nn.Module) -> None:
    """Mark a sparse layer's weight parameter with its layer."""
    param._dsparse_owner = weakref.ref(layer)


def owner_of(param: torch.Tensor) -> Any:
    """The SparseLinear whose weight this parameter is, if any."""
    ref = getattr(param, "_dsparse_owner", None)
    return ref() if ref is not None else None


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    seen: set[int] = set()
    for group in optimizer.param_groups:
        for param in group["params"]:
            layer = owner_of(param)
            if layer is not None and not layer.engine_managed and id(layer) not in seen:
                seen.add(id(layer))
                layer.on_optimizer_step()


def install_optimizer_hook() -> None:
    """Register the global post-step hook once per process."""
    global _handle
    if _handle is None:
        _handle = register_optimizer_step_post_hook(_after_optimizer_step)
