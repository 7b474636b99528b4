"""How much state a (sparse) DeepSpeed engine holds: the numbers behind the memory claims."""
from __future__ import annotations

import torch

from .nn import sparse_modules


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 keeps the full size in ds_numel


def memory_report(engine) -> dict[str, int]:
    """Element counts of this rank's optimizer state and of the model's trainable tensors.

    ``optimizer_state_numel``: every tensor the base optimizer holds state in on this rank
    (Adam moments, step) plus its fp32 master copies where those are separate from the
    model's parameters. ``sparse_values_numel``: the kept values of all sparse layers
    (whole model). ``dense_params_numel``: the other trainable parameters (whole model).
    ``dense_equivalent_numel``: what the sparse layers would hold as dense weights.
    """
    model, opt, base = engine.module, engine.optimizer, engine.basic_optimizer
    model_params = {id(p) for p in model.parameters()}
    state = sum(t.numel() for entry in base.state.values() for t in entry.values() if torch.is_tensor(t))
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3 keeps masters outside param_groups between steps
        masters = sum(t.numel() for t in opt.fp32_partitioned_groups_flat)
    else:
        masters = sum(p.numel() for g in base.param_groups for p in g["params"] if id(p) not in model_params)
    sparse_weights, kept, dense_equivalent = set(), 0, 0
    for _, layer in sparse_modules(model):
        sparse_weights.add(id(layer._param))
        kept += layer.out_features * layer.in_features * layer.n // layer.m
        dense_equivalent += layer.out_features * layer.in_features
    dense = sum(_numel(p) for p in model.parameters() if p.requires_grad and id(p) not in sparse_weights)
    return {"optimizer_state_numel": state + masters, "sparse_values_numel": kept, "dense_params_numel": dense,
            "dense_equivalent_numel": dense_equivalent}
