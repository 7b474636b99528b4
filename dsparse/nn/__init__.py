"""Sparse modules and the converter that puts them into a model."""
from .convert import sparse_modules, sparsify
from .fused import FusedGatedMLP, FusedRMSNorm, fuse_model, fused_counts, fused_from
from .projections import fuse_projections, projection_groups
from .sparse_linear import SparseLinear

__all__ = ["SparseLinear", "sparsify", "sparse_modules", "fuse_model", "fused_counts", "fused_from", "FusedRMSNorm",
           "FusedGatedMLP", "fuse_projections", "projection_groups"]
