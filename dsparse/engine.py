"""``dsparse.initialize``: a DeepSpeed engine whose model has SLoPe sparse layers.

One training step, as a user's loop drives it::

    loss = engine(**batch).loss   # each SparseLinear: Y = X (M⊙W)ᵀ on its compressed operand (q/k/v and
                                  # gate/up as one product each: projections); RMSNorm, SwiGLU and
                                  # RoPE run fused Triton kernels ("fusion", dense runs too)
    engine.backward(loss)         # dX = dY W̃ (double-pruned transpose); the kept-entry dW lands in
                                  # values.grad, which DeepSpeed reduces (half the bytes of dense);
                                  # run on this thread, not autograd's device thread ("autograd")
    engine.step()                 # DeepSpeed: ZeRO step, clipping, loss scale, LR schedule (ZeRO-1/2's
                                  # inf/NaN check and gradient norm fused, and no host sync under
                                  # "step": {"sync_free": true}: zero_checks); then, if the
                                  # step was applied, SparseTraining.after_step: at each phase's first
                                  # step the ranks take rank 0's GEMM plans (agree_plans); the W̃ᵀ masks
                                  # follow their schedule (checked across ranks), the phase advances (end of
                                  # dense warm-up, lazy adapters), and every layer's operands are
                                  # refreshed from the new values (operand_refresh: one CUDA graph)

Everything that trains is an ordinary parameter (kept values, dense weights, adapters), so
ZeRO 0-3, fp32/fp16/bf16, gradient accumulation, clipping, LR schedules and checkpoints
are DeepSpeed's own. dsparse adds the schedule, the mask checks, and checkpoint manifests.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
import torch.distributed as dist
import torch.nn as nn

from . import checkpoint as ckpt
from .config import AutogradConfig, FusionConfig, SparsityConfig, StepConfig
from .distributed import agree_plans, broadcast_masks, check_mask_agreement
from .nn import fuse_model, fuse_projections, sparse_modules, sparsify
from .nn.operand_refresh import OperandRefresh
from .nn.sparse_linear import store_steps
from .optim_state import restart_group
from .schedule import Schedule
from .zero_checks import fuse_zero_checks

logger = logging.getLogger(__name__)


def load_ds_config(config: str | dict | None, args: Any = None) -> dict[str, Any]:
    """The DeepSpeed config as a fresh dict, from a path, a dict, or ``args.deepspeed_config``."""
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None)
    if config is None:
        raise ValueError("no DeepSpeed config: pass config= (a path or dict) or --deepspeed_config")
    if isinstance(config, (str, os.PathLike)):
        if not os.path.exists(config):
            raise FileNotFoundError(f"DeepSpeed config {config} does not exist")
        with open(config) as f:
            return json.load(f)
    return copy.deepcopy(dict(config))


class SparseTraining:
    """The sparse side of an engine: its layers, schedule, and the hooks DeepSpeed's step calls."""

    def __init__(self, model: nn.Module, config: SparsityConfig, zero_stage: int) -> None:
        self.config = config
        self.zero_stage = zero_stage
        self.schedule = Schedule.from_config(config)
        self.names, self.layers = [], []
        for name, layer in sparse_modules(model):
            self.names.append(name)
            self.layers.append(layer)
        self.refresh_operands = OperandRefresh(self.layers)
        self.adapter_group: int | None = None
        self.group_settings: list[dict[str, Any]] = []  # each param group's hyperparameters at start
        self.plans_agreed_in: str | None = None  # the phase whose products' plans the ranks last agreed on

    # ------------------------------------------------------------------ setup
    @classmethod
    def prepare(cls, model: nn.Module, config: SparsityConfig, zero_stage: int) -> "SparseTraining":
        """Sparsify ``model`` per ``config``, add (inactive) adapters, and agree on masks across ranks."""
        if config.enabled and not any(True for _ in sparse_modules(model)):
            if config.dense_warmup_steps and config.compress:
                logger.warning("dsparse: a dense warm-up keeps the sparse layers' dense weights (compress=false) "
                               "for the whole run; their memory savings are lost")
                config.compress = False
            sparsify(model, config, cache_operands=zero_stage != 3)
        state = cls(model, config, zero_stage)
        if not config.enabled:
            return state
        if config.adapters is not None:
            for i, (name, layer) in enumerate(zip(state.names, state.layers)):
                if not layer.has_adapter:
                    gen = torch.Generator().manual_seed(config.adapters.seed + i)
                    layer.add_adapter(config.adapters.rank_for(layer.in_features, layer.out_features),
                                      alpha=config.adapters.alpha, active=False, generator=gen)
        for layer in state.layers:
            layer.engine_managed = True
            layer.cache_operands = zero_stage != 3
            layer.dense_mode = config.dense_warmup_steps > 0 and layer.step < config.dense_warmup_steps
        broadcast_masks(state.layers)
        check_mask_agreement(state.layers, step=state.step)
        return state

    def param_groups(self, model: nn.Module, optimizer: Any, model_parameters: Any) -> Any:
        """The parameters DeepSpeed gets: the caller's (or decay / no-decay groups) plus an adapter group.

        Adapters train in their own group so that their weight decay and Adam step can be
        set when they start; until then they get no gradient and stay put.
        """
        adapters = [p for layer in self.layers if layer.has_adapter for p in (layer.adapter_a, layer.adapter_b)]
        adapter_ids = {id(p) for p in adapters}
        current = {id(p) for p in model.parameters()}
        if isinstance(optimizer, torch.optim.Optimizer):
            stale = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in current]
            if stale:
                raise ValueError("the optimizer holds parameters this model no longer has (dsparse.initialize "
                                 "replaced the dense layers): pass an optimizer factory `lambda params: ...`, or call "
                                 "dsparse.sparsify(model, config) before building the optimizer")
            if adapters:
                optimizer.add_param_group({"params": adapters, "weight_decay": 0.0})
                self.adapter_group = len(optimizer.param_groups) - 1
            return model_parameters
        if model_parameters is None:
            decay, no_decay = [], []
            for p in model.parameters():
                if p.requires_grad and id(p) not in adapter_ids:
                    (decay if p.dim() >= 2 else no_decay).append(p)
            groups = [{"params": decay}] + ([{"params": no_decay, "weight_decay": 0.0}] if no_decay else [])
        else:
            groups = list(model_parameters)
            if groups and not isinstance(groups[0], dict):
                groups = [{"params": groups}]
            for g in groups:
                g["params"] = list(g["params"])
                if any(id(p) not in current for p in g["params"]):
                    raise ValueError("model_parameters holds parameters this model no longer has (dsparse.initialize "
                                     "replaced the dense layers): pass model_parameters=None, or sparsify first")
                g["params"] = [p for p in g["params"] if id(p) not in adapter_ids]
            groups = [g for g in groups if g["params"]]
        if adapters:
            groups.append({"params": adapters, "weight_decay": 0.0})
            self.adapter_group = len(groups) - 1
        return groups

    # ------------------------------------------------------------------ schedule
    @property
    def step(self) -> int:
        """Applied optimizer steps (the sparse schedule's clock; 0 for a dense run)."""
        return self.layers[0].step if self.layers else 0

    @property
    def phase(self) -> str:
        """``"dense"``, ``"sparse"`` or ``"adapters"``: the phase of the next optimizer step."""
        return self.schedule.phase(self.step)

    def _gathered(self, params: list[torch.Tensor]):
        """Full parameters for reading (ZeRO-3 partitions them between uses)."""
        if self.zero_stage == 3 and params:
            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return contextlib.nullcontext()

    def after_step(self, engine) -> None:
        """Called once per applied optimizer step: mask schedule, operand refresh, phase changes."""
        if not self.layers:
            return
        ran = self.phase  # the phase of the step just applied: its products have looked up their plans
        if ran != self.plans_agreed_in:
            agree_plans()
            self.plans_agreed_in = ran
        changed = []
        for layer in self.layers:  # one layer gathered at a time under ZeRO-3, only when its mask changes
            with self._gathered([layer._param] if layer.mask_change_due() else []):
                changed.append(layer.on_optimizer_step(store_step=False))
        store_steps(self.layers)
        if any(changed) and self.config.check_masks:
            check_mask_agreement(self.layers, self.step)
        self._enter_phase(engine)
        self.refresh_operands()  # all layers' GEMM operands now (one CUDA graph replay), not in the forward

    def _enter_phase(self, engine, restored: bool = False) -> None:
        """Bring the layers and optimizer in line with the current phase."""
        phase = self.phase
        warm = [layer for layer in self.layers if layer.dense_mode]
        if phase != "dense" and warm:
            for layer in warm:
                with self._gathered([layer._param]):
                    layer.dense_mode = False
                    if not restored:
                        layer.reprune()
            check_mask_agreement(self.layers, self.step)
            logger.info("dsparse: dense warm-up over after %d steps; training sparse", self.step)
        if phase == "dense" and self.schedule.sparse:
            for layer in self.layers:
                layer.dense_mode = True
        if phase == "adapters" and self.adapter_group is not None:
            group = engine.optimizer.param_groups[self.adapter_group]
            group["weight_decay"] = self.config.adapters.weight_decay
            if not self.layers[0].adapter_is_active:
                for layer in self.layers:
                    layer.set_adapter_active(True)
                if not restored:
                    restart_group(engine, self.adapter_group)
                logger.info("dsparse: lazy low-rank adapters train from step %d", self.step)

    def bind(self, engine) -> None:
        """Remember the configured param-group settings, and enter the current phase."""
        self.group_settings = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
                               for g in engine.optimizer.param_groups]
        self._enter_phase(engine, restored=True)

    def after_load(self, engine, universal: bool) -> None:
        """Re-derive host-side state from the restored buffers.

        DeepSpeed 0.19.8's universal load under ZeRO-3 gives every param group group 0's
        settings; the configured ones are put back.
        """
        if universal and self.zero_stage == 3:
            for group, settings in zip(engine.optimizer.param_groups, self.group_settings):
                group.update(settings)
        for layer in self.layers:
            layer.sync_host_state()
            layer.mark_values_changed()
        self._enter_phase(engine, restored=True)

    def manifest(self, engine) -> dict[str, Any]:
        return {"step": self.step, "phase": self.phase, "global_steps": engine.global_steps,
                "world_size": engine.world_size, "zero_stage": self.zero_stage,
                "sparsity": self.config.to_dict(), "layers": ckpt.sparsity_signature(engine.module)}


class _SparseEngineMixin:
    """What dsparse adds to DeepSpeed's engine: the step hook, single-threaded backward, safer checkpoints."""

    sparsity: SparseTraining
    autograd_config: AutogradConfig

    def backward(self, loss, *args, **kwargs):
        with torch.autograd.set_multithreading_enabled(self.autograd_config.multithreading):
            return super().backward(loss, *args, **kwargs)

    def step(self, lr_kwargs=None):
        boundary = self.is_gradient_accumulation_boundary()
        super().step(lr_kwargs=lr_kwargs)
        if boundary and self.was_step_applied():
            self.sparsity.after_step(self)

    @property
    def device_skipped_steps(self) -> int:
        """Steps whose update the fused optimizer skipped on the device for inf/NaN gradients
        (``"step": {"sync_free": true}``); reading it waits for the last step to finish."""
        count = getattr(self.optimizer, "count_device_skips", None)
        return count() if count is not None else 0

    def save_checkpoint(self, save_dir, tag=None, client_state={}, save_latest=True, exclude_frozen_parameters=False):
        """DeepSpeed's save, then (once every rank is done) the manifest and an atomic ``latest``."""
        tag = str(tag) if tag is not None else f"global_step{self.global_steps}"
        tag_dir = os.path.join(save_dir, tag)
        rank0 = self.global_rank == 0
        if rank0 and os.path.exists(os.path.join(tag_dir, ckpt.MANIFEST)):
            os.remove(os.path.join(tag_dir, ckpt.MANIFEST))  # re-saving a tag: invalid until complete
        _barrier()
        saved = super().save_checkpoint(save_dir, tag, client_state=client_state, save_latest=False,
                                        exclude_frozen_parameters=exclude_frozen_parameters)
        _barrier()
        if rank0:
            ckpt.write_manifest(tag_dir, self.sparsity.manifest(self))
            if save_latest:
                ckpt.atomic_write_text(os.path.join(save_dir, "latest"), tag)
        _barrier()
        return saved

    def load_checkpoint(self, load_dir, tag=None, **kwargs):
        """Refuse checkpoints of another sparsity layout or interrupted saves; then DeepSpeed's load."""
        universal = self.load_universal_checkpoint()
        tag = ckpt.resolve_tag(load_dir, tag, universal)
        manifest = ckpt.read_manifest(os.path.join(load_dir, tag))
        diffs = ckpt.signature_differences(manifest["layers"], ckpt.sparsity_signature(self.module))
        if diffs:
            raise ValueError(f"checkpoint {os.path.join(load_dir, tag)} was written with another sparsity "
                             "configuration: " + "; ".join(diffs))
        path, client_state = super().load_checkpoint(load_dir, tag, **kwargs)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(load_dir, tag)}")
        if universal:
            ckpt.restore_buffers(self.module, path)
        self.sparsity.after_load(self, universal)
        return path, client_state


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


_ENGINE_CLASSES: dict[type, type] = {}


def _sparse_engine_class(base: type) -> type:
    if base not in _ENGINE_CLASSES:
        _ENGINE_CLASSES[base] = type(f"Sparse{base.__name__}", (_SparseEngineMixin, base), {})
    return _ENGINE_CLASSES[base]


def initialize(args: Any = None, model: nn.Module | None = None, optimizer: Any = None,
               model_parameters: Any = None, training_data: Any = None, lr_scheduler: Any = None,
               config: str | dict | None = None, **kwargs: Any) -> tuple[Any, Any, Any, Any]:
    """Sparsify ``model`` per the config's ``"sparsity"`` section, fuse its elementwise blocks per
    ``"fusion"`` (dense runs too), and build its DeepSpeed engine.

    Takes everything :func:`deepspeed.initialize` takes and returns what it returns
    ``(engine, optimizer, dataloader, lr_scheduler)``. Without a ``"sparsity"`` section (or
    with ``"enabled": false``) the run is dense, through the same engine. Pass optimizers as
    factories (``lambda params: torch.optim.AdamW(params, ...)``) or via the config's
    ``"optimizer"`` section: the model's dense layers are replaced here.
    """
    if model is None:
        raise ValueError("dsparse.initialize needs model=")
    ds_config = load_ds_config(config, args)
    if args is not None and getattr(args, "deepspeed_config", None) is not None:
        args = copy.copy(args)
        args.deepspeed_config = None  # the config travels as the dict below
    sparsity = SparsityConfig.from_dict(ds_config.pop("sparsity", {"enabled": False}))
    fusion = FusionConfig.from_dict(ds_config.pop("fusion", None))
    autograd_config = AutogradConfig.from_dict(ds_config.pop("autograd", None))
    step_config = StepConfig.from_dict(ds_config.pop("step", None))
    zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if not dist.is_initialized():
        deepspeed.init_distributed(auto_mpi_discovery=True, distributed_port=int(os.environ.get("MASTER_PORT", 29500)))
    if torch.cuda.is_available():
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))  # as DeepSpeed's engine will
        if sparsity.enabled:
            model.to(get_accelerator().current_device_name())  # prune on this rank's GPU (DeepSpeed moves it there)
    if fusion.active(get_accelerator().device_name() == "cuda"):
        fuse_model(model, rms_norm=fusion.rms_norm, swiglu=fusion.swiglu, rope=fusion.rope,
                   min_rows=fusion.min_rows, swiglu_mvue=fusion.swiglu_mvue)
    state = SparseTraining.prepare(model, sparsity, zero_stage)
    if fusion.active(get_accelerator().device_name() == "cuda") and fusion.projections and zero_stage != 3:
        fuse_projections(model)  # after sparsify: sparse or dense siblings alike
    params = state.param_groups(model, optimizer, model_parameters)
    engine, optimizer, dataloader, lr_scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, model_parameters=params, training_data=training_data,
        lr_scheduler=lr_scheduler, config=ds_config, **kwargs)
    if fuse_zero_checks(engine.optimizer) and step_config.sync_free:
        engine.optimizer.enable_device_skip()
    engine.__class__ = _sparse_engine_class(type(engine))
    engine.sparsity = state
    engine.autograd_config = autograd_config
    state.bind(engine)
    return engine, optimizer, dataloader, lr_scheduler


__all__ = ["initialize", "SparseTraining", "load_ds_config"]
