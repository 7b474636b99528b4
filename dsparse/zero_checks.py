"""DeepSpeed ZeRO-1/2's per-step gradient checks in a few multi-tensor kernels, and without host syncs.

Before each step DeepSpeed 0.19.8's ZeRO-1/2 optimizer checks every gradient for inf/NaN
(in bf16 too: ``bf16.check_grad_overflow`` is on by default) and takes the global norm for
clipping, each with a Python loop that launches several kernels per gradient tensor. On a
1B LLaMA that is ~2000 tiny launches per step, which the GPU waits on (the step profile of
``bench.step`` shows it idle between them). The optimizer class swapped in here computes
the same checks with torch's multi-tensor (``foreach``) norms: one launch per ~100 tensors.

DeepSpeed also reads two verdicts on the host each step (the inf/NaN flag, and whether the
clipping norm is valid): each a device sync, after which the GPU idles while the host issues
the optimizer and the next forward. The class clips on the device, and with
:meth:`FusedChecksZeroOptimizer.enable_device_skip` (``"step": {"sync_free": true}``) leaves
the skip of a non-finite step to torch's fused Adam kernel (``found_inf``); the host reads
the verdict one step later, from a copy that finished long before.
"""
from __future__ import annotations

import logging

import torch
from deepspeed import comm as dist
from deepspeed.runtime.constants import PIPE_REPLICATED
from deepspeed.runtime.utils import is_model_parallel_parameter, mask_nan_or_inf_with_val_inplace
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

logger = logging.getLogger(__name__)


def _stacked_norms(tensors: list[torch.Tensor], ord: float) -> torch.Tensor:
    """Each tensor's ``ord``-norm, accumulated and returned in fp32, as one vector."""
    return torch.stack(torch._foreach_norm(tensors, ord, dtype=torch.float32))


class FusedChecksZeroOptimizer(DeepSpeedZeroOptimizer):
    """DeepSpeed's ZeRO-1/2 optimizer with its inf/NaN check and L2 gradient norm fused, clipping on
    the device, and (once :meth:`enable_device_skip`) non-finite steps skipped on the device."""

    device_skip = False
    device_skipped_steps = 0  # steps the fused optimizer skipped for inf/NaN gradients (device_skip)

    def enable_device_skip(self) -> bool:
        """Skip non-finite steps on the device instead of checking on the host, where that computes
        what DeepSpeed's check does: bf16 (no loss scaler to update), the global norm computed,
        no offload, and a torch Adam/AdamW with ``fused=True`` (its kernel honours ``found_inf``).
        True if enabled."""
        inner = self.optimizer
        if not (self.dtype == torch.bfloat16 and self.check_grad_overflow and self.compute_grad_norm
                and not self.cpu_offload and not self.torch_autocast_gradscaler and not self.zenflow
                and isinstance(inner, torch.optim.Adam) and all(g.get("fused") for g in inner.param_groups)):
            return False
        self.check_grad_overflow = False  # DeepSpeed's host check off; found_inf below does its work
        self.device_skip = True
        self._skip_verdict: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
        return True

    def step(self, closure=None):
        if not self.device_skip:
            return super().step(closure)
        self.count_device_skips()
        try:
            super().step(closure)  # sets found_inf in scaled_global_norm
            found_inf = getattr(self.optimizer, "found_inf", None)
        finally:
            self.optimizer.found_inf = None
        if found_inf is not None:
            self._skip_verdict = _host_copy(found_inf)

    def scaled_global_norm(self, norm_type=2):
        norm = super().scaled_global_norm(norm_type)
        if self.device_skip:  # DeepSpeed's bf16 check skips a step whose norm is not finite; so does this
            self.optimizer.found_inf = (~torch.isfinite(norm)).to(torch.float32).reshape(())
        return norm

    def count_device_skips(self) -> int:
        """Bring :attr:`device_skipped_steps` up to date with the last step's verdict (waiting for that
        step's end at most) and return it."""
        verdict, self._skip_verdict = getattr(self, "_skip_verdict", None), None
        if verdict is not None:
            flag, done = verdict
            if done is not None:
                done.synchronize()
            if flag.item():
                self.device_skipped_steps += 1
                logger.warning("dsparse: the last optimizer step had inf/NaN gradients; the fused optimizer "
                               "skipped it on the device (%d such steps so far)", self.device_skipped_steps)
        return self.device_skipped_steps

    def unscale_and_clip_grads(self, grad_groups_flat, total_norm):
        """DeepSpeed's unscale and clip with the norm kept on the device: an invalid norm (inf, NaN or
        DeepSpeed's -1) clips as an infinite one, as DeepSpeed's host check makes it."""
        if not torch.is_tensor(total_norm) or self.clip_grad <= 0.0:
            return super().unscale_and_clip_grads(grad_groups_flat, total_norm)
        clip_norm = torch.where(torch.isfinite(total_norm) & (total_norm >= 0), total_norm, float("inf"))
        clip = torch.clamp(((clip_norm / self.loss_scale) + 1e-6) / self.clip_grad, min=1.0)
        combined_scale = clip * self.loss_scale
        for grad in grad_groups_flat:
            for g in grad if isinstance(grad, list) else [grad]:
                g.data.mul_(1. / combined_scale)

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


def _host_copy(flag: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A host copy of a device scalar that arrives without blocking, and the event that marks it done."""
    if not flag.is_cuda:
        return flag.clone(), None
    host = torch.empty(flag.shape, dtype=flag.dtype, pin_memory=True)
    host.copy_(flag, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def fuse_zero_checks(optimizer: object) -> bool:
    """Give DeepSpeed's ZeRO-1/2 optimizer (exactly that class) the fused checks; True if it was one."""
    if type(optimizer) is not DeepSpeedZeroOptimizer:
        return False
    optimizer.__class__ = FusedChecksZeroOptimizer
    return True


__all__ = ["FusedChecksZeroOptimizer", "fuse_zero_checks"]
