"""DeepSpeed ZeRO-1/2's per-step gradient checks in a few multi-tensor kernels.

Before each step DeepSpeed 0.19.8's ZeRO-1/2 optimizer checks every gradient for inf/NaN
(in bf16 too: ``bf16.check_grad_overflow`` is on by default) and takes the global norm for
clipping, each with a Python loop that launches several kernels per gradient tensor. On a
1B LLaMA that is ~2000 tiny launches per step, which the GPU waits on (the step profile of
``bench.step`` shows it idle between them). The optimizer class swapped in here computes
the same checks with torch's multi-tensor (``foreach``) norms: one launch per ~100 tensors.
"""
from __future__ import annotations

import torch
from deepspeed import comm as dist
from deepspeed.runtime.constants import PIPE_REPLICATED
from deepspeed.runtime.utils import is_model_parallel_parameter, mask_nan_or_inf_with_val_inplace
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer


def _stacked_norms(tensors: list[torch.Tensor], ord: float) -> torch.Tensor:
    """Each tensor's ``ord``-norm, accumulated and returned in fp32, as one vector."""
    return torch.stack(torch._foreach_norm(tensors, ord, dtype=torch.float32))


class FusedChecksZeroOptimizer(DeepSpeedZeroOptimizer):
    """DeepSpeed's ZeRO-1/2 optimizer with its inf/NaN check and L2 gradient norm fused."""

    def has_overflow_partitioned_grads_serial(self) -> torch.Tensor:
        """Whether any gradient of this rank's partition holds inf or NaN: the largest magnitude
        of each tensor is inf (or NaN) exactly when one of its entries is."""
        grads = [g for i in range(len(self.bit16_groups)) for g in self.averaged_gradients[i] if g is not None]
        if not grads:
            return torch.zeros(1, dtype=torch.bool, device=self.device)
        return ~torch.isfinite(_stacked_norms(grads, float("inf"))).all().reshape(1)

    def get_grad_norm_direct(self, gradients, params, norm_type=2):
        """The global L2 norm of ``gradients`` over the data- and model-parallel groups, as DeepSpeed
        computes it (the same tensors counted, -1 for inf/NaN); other norms go to DeepSpeed's loop."""
        if float(norm_type) != 2.0:
            return super().get_grad_norm_direct(gradients, params, norm_type)
        unpadded = (g for g in gradients if not getattr(g, "_zero_padding", False))
        counted = [g.detach() for g, p in zip(unpadded, params)
                   if not (hasattr(p, PIPE_REPLICATED) and p.ds_pipe_replicated)
                   and (is_model_parallel_parameter(p) or self.model_parallel_rank == 0)]
        if counted:
            total = _stacked_norms(counted, 2.0).double().pow(2).sum().float()
        else:
            total = torch.zeros((), dtype=torch.float32, device=self.device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
        self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
        total = total.sqrt()
        mask_nan_or_inf_with_val_inplace(total, device=self.device)
        return total


def fuse_zero_checks(optimizer: object) -> bool:
    """Give DeepSpeed's ZeRO-1/2 optimizer (exactly that class) the fused checks; True if it was one."""
    if type(optimizer) is not DeepSpeedZeroOptimizer:
        return False
    optimizer.__class__ = FusedChecksZeroOptimizer
    return True


__all__ = ["FusedChecksZeroOptimizer", "fuse_zero_checks"]
