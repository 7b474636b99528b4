"""Backends that run the compressed GEMMs, and the rule that picks one for a layer."""
from __future__ import annotations

import torch

from .base import Backend
from .cusparselt import CusparseltBackend, cusparselt_available
from .reference import ReferenceBackend

BACKENDS: dict[str, Backend] = {b.name: b for b in (ReferenceBackend(), CusparseltBackend())}
BACKEND_NAMES = ("auto", *BACKENDS)

__all__ = ["Backend", "BACKENDS", "BACKEND_NAMES", "resolve_backend", "check_backend_name", "cusparselt_available"]


def check_backend_name(name: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown sparsity backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    return name


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, n: int, m: int, out_features: int,
                    in_features: int, layer: str = "layer") -> Backend:
    """The backend that runs a layer: the named one (or an error saying why it cannot run
    here), or for ``"auto"`` cuSPARSELt where it can run and the reference otherwise."""
    check_backend_name(name)
    shape = (device, dtype, n, m, out_features, in_features)
    if name == "auto":
        fast = BACKENDS["cusparselt"]
        return fast if fast.unsupported_reason(*shape) is None else BACKENDS["reference"]
    backend = BACKENDS[name]
    reason = backend.unsupported_reason(*shape)
    if reason is not None:
        raise RuntimeError(f"{layer}: backend {name!r} cannot run here: {reason}. "
                           "Use backend 'auto' to fall back to 'reference' where needed.")
    return backend
