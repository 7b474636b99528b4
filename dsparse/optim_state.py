"""Reach into DeepSpeed's optimizer wrappers for the few things dsparse must change by hand.

DeepSpeed has no public API to reset one param group's Adam step or to find the base
optimizer's state of a group (its tensor-fragment API covers fp32 masters and moments, not
``step``; verified on 0.19.8). These helpers know the wrappers of the pinned version:
ZeRO-1/2 (flat fp32 partition per group), BF16_Optimizer, ZeRO-3 (sub-groups), the stage-0
fp16/bf16 wrapper, and plain stage 0.
"""
from __future__ import annotations

import torch


def group_state_keys(engine, group: int) -> list[torch.Tensor]:
    """The tensors keying ``engine.basic_optimizer.state`` for param group ``group``."""
    opt, base = engine.optimizer, engine.basic_optimizer
    if hasattr(opt, "sub_group_to_group_id"):  # ZeRO-3: sub-groups of flat fp32 partitions
        return [opt.fp32_partitioned_groups_flat[s] for s, g in opt.sub_group_to_group_id.items() if g == group]
    if hasattr(opt, "fp32_groups") and not hasattr(opt, "single_partition_of_fp32_groups") \
            and not hasattr(opt, "fp32_groups_flat_partition"):  # stage-0 fp16/bf16 wrapper
        return list(opt.fp32_groups[group])
    return list(base.param_groups[group]["params"])  # ZeRO-1/2, BF16_Optimizer, plain stage 0


def restart_group(engine, group: int) -> None:
    """Make param group ``group`` start Adam afresh: step 0 and zero moments (all ranks call it)."""
    state = engine.basic_optimizer.state
    for key in group_state_keys(engine, group):
        entry = state.get(key)
        if not entry:
            continue
        for name, value in entry.items():
            if torch.is_tensor(value):
                value.zero_()
            elif name == "step":
                entry[name] = 0
