"""Turn a model's linear layers into SparseLinear, in place, per the sparsity config."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch.nn as nn

from ..config import SparsityConfig
from .sparse_linear import SparseLinear

logger = logging.getLogger(__name__)

_SUPPORTED_DTYPES = ("torch.float32", "torch.float16", "torch.bfloat16", "torch.float64")


def _is_convertible(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        return None


def sparse_modules(model: nn.Module) -> Iterator[tuple[str, SparseLinear]]:
    """Yield ``(qualified name, module)`` for every SparseLinear in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            yield name, module


def sparsify(model: nn.Module, config: SparsityConfig | dict[str, Any] | None = None, *,
             cache_operands: bool = True) -> nn.Module:
    """Replace the selected ``nn.Linear`` / GPT-2 ``Conv1D`` layers of ``model`` by SparseLinear, in place.

    A layer is selected when its qualified name matches an ``include`` regex and no
    ``exclude`` regex (``re.search``); the output head (``get_output_embeddings()``) stays
    dense unless ``exclude_output_head`` is false. A selected layer that cannot be made
    sparse (a dimension not divisible by M, a non-float dtype) raises a ValueError naming
    it and the fix, or with ``skip_incompatible`` is skipped with a warning. Returns
    ``model``.
    """
    config = SparsityConfig.from_dict(config)
    if not config.enabled:
        return model
    head = _output_head(model) if config.exclude_output_head else None
    targets = [(name, module) for name, module in model.named_modules()
               if name and _is_convertible(module) and module is not head and config.selects(name)]
    if not targets:
        logger.warning("dsparse.sparsify: no layer matched include=%s exclude=%s", config.include, config.exclude)
    for index, (name, module) in enumerate(targets):
        n, m = config.pattern_for(name)
        try:
            if str(module.weight.dtype) not in _SUPPORTED_DTYPES:
                raise ValueError(f"dtype {module.weight.dtype} is not supported; sparse layers need float32, "
                                 "float16 or bfloat16 weights")
            sparse = SparseLinear.from_dense(module, pattern=f"{n}:{m}", backend=config.backend,
                                             mask_change_freq=config.mask_change_freq, compress=config.compress,
                                             double_prune=config.double_prune, mvue_dw=config.mvue_dw,
                                             mvue_seed=index, cache_operands=cache_operands)
        except ValueError as e:
            if config.skip_incompatible:
                logger.warning("dsparse.sparsify: skipping %s (%s): %s", name, type(module).__name__, e)
                continue
            raise ValueError(f"cannot sparsify layer {name!r} ({type(module).__name__}): {e}. "
                             "Exclude it (sparsity.exclude) or set sparsity.skip_incompatible to skip such layers.") \
                from None
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, sparse)
    return model
