"""dsparse: SLoPe double-pruned N:M sparse pretraining on DeepSpeed.

The core (``SparseLinear``, ``sparsify``) needs only torch; ``initialize`` and
``memory_report`` import DeepSpeed on first use.
"""
from typing import Any

from .config import AdapterConfig, FusionConfig, SparsityConfig
from .nn import SparseLinear, fuse_model, fuse_projections, fused_counts, sparse_modules, sparsify

__version__ = "0.1.0"

__all__ = ["SparseLinear", "SparsityConfig", "AdapterConfig", "FusionConfig", "sparsify", "sparse_modules",
           "fuse_model", "fuse_projections", "fused_counts", "initialize",
           "memory_report", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "initialize":
        from .engine import initialize

        return initialize
    if name == "memory_report":
        from .memory import memory_report

        return memory_report
    raise AttributeError(f"module 'dsparse' has no attribute {name!r}")
