"""Multi-rank DeepSpeed scenarios for tests/test_engine.py (run under `deepspeed`, `mpiexec` or alone).

Each scenario trains a tiny LLaMA built from a config on deterministic data: the global
batch of optimizer step s is drawn from seed s and split across ranks, so any world size
sees the same global batches. Rank 0 writes what it measured as JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import deepspeed.comm as dcomm  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import dsparse  # noqa: E402
from dsparse.distributed import mask_checksum  # noqa: E402
from dsparse.process import end_process  # noqa: E402

GLOBAL_BATCH, SEQ, VOCAB = 4, 16, 64
OPTIONS = {"bf16": False, "backend": "auto", "mvue_dw": False, "projections": False}  # set from the command line


def tiny_llama() -> torch.nn.Module:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def ds_config(stage: int, world: int, ga: int = 1, bf16: bool = False, sparsity: dict | None = None,
              total_steps: int = 8, universal: bool = False) -> dict:
    bf16 = bf16 or OPTIONS["bf16"]
    if sparsity is None:
        sparsity = {"mask_change_freq": 2, "total_steps": total_steps, "backend": OPTIONS["backend"],
                    "mvue_dw": OPTIONS["mvue_dw"], "adapters": {"rank": 4, "start_step": 5, "weight_decay": 0.01}}
    cfg = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world // ga,
        "gradient_accumulation_steps": ga,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-2, "weight_decay": 0.1, "torch_adam": True}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 2, "total_num_steps": total_steps,
                                                          "warmup_max_lr": 2e-2, "warmup_type": "linear"}},
        "gradient_clipping": 0.5,
        "sparsity": sparsity,
    }
    if OPTIONS["projections"]:  # q/k/v and gate/up grouped, without the (interpreted) Triton kernels
        cfg["fusion"] = {"enabled": True, "rms_norm": False, "swiglu": False, "rope": False, "projections": True}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    if universal:
        cfg["checkpoint"] = {"load_universal": True}
    return cfg


def batch(step: int, micro: int, ga_index: int, ga: int) -> torch.Tensor:
    """This rank's micro-batch ``ga_index`` of optimizer step ``step``."""
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1000 + step))
    per_rank = GLOBAL_BATCH // dist.get_world_size()
    mine = ids[dist.get_rank() * per_rank:(dist.get_rank() + 1) * per_rank]
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    return mine[ga_index * micro:(ga_index + 1) * micro].to(device)


def mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().float().clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


def _grad_bytes() -> dict[str, int]:
    raw = dcomm.comms_logger.get_raw_data()
    return {op: sum(size * v[0] for size, v in per.items()) for op, per in raw.items()
            if op in ("all_reduce", "reduce", "reduce_scatter_tensor", "reduce_scatter")}


def train(engine, first: int, last: int, nan_step: int | None = None, comm_log: bool = False) -> list[dict]:
    """Optimizer steps first..last-1; returns per-step records (with the first micro-batch's
    gradient-reduction bytes when ``comm_log``)."""
    ga = engine.gradient_accumulation_steps()
    micro = engine.train_micro_batch_size_per_gpu()
    rows = []
    for step in range(first, last):
        losses, grad_bytes = [], None
        for g in range(ga):
            ids = batch(step, micro, g, ga)
            logging = comm_log and step == first and g == 0
            if logging:
                dcomm.configure(enabled=True, prof_all=True)
                dcomm.comms_logger.reset_data()
            loss = engine(input_ids=ids, labels=ids).loss
            if step == nan_step:
                loss = loss * float("nan")
            engine.backward(loss)
            engine.step()
            if logging:
                grad_bytes = _grad_bytes()
                dcomm.configure(enabled=False)
            losses.append(mean_over_ranks(loss))
        rows.append({"step": step, "loss": sum(losses) / ga, "phase": engine.sparsity.phase,
                     "applied": engine.was_step_applied(), "mask_step": engine.sparsity.step,
                     "lr": engine.get_lr()[0], "checksum": mask_checksum(engine.sparsity.layers).tolist(),
                     "grad_bytes": grad_bytes})
    return rows


def build(config: dict):
    engine, *_ = dsparse.initialize(model=tiny_llama(), config=config)
    return engine


def scenario_equivalence(args) -> dict:
    """Per-step losses, masks, optimizer-state size and gradient bytes for every ZeRO stage."""
    out = {}
    for stage in args.stages:
        for ga in (1, 2):
            engine = build(ds_config(stage, dist.get_world_size(), ga=ga))
            rows = train(engine, 0, 8, comm_log=True)
            trainable = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if p.requires_grad)
            adapters = sum(getattr(p, "ds_numel", p.numel()) for layer in engine.sparsity.layers
                           for p in (layer.adapter_a, layer.adapter_b))
            out[f"stage{stage}_ga{ga}"] = {"rows": rows, "memory": dsparse.memory_report(engine),
                                           "trainable_numel": trainable, "adapter_numel": adapters}
    return out


def scenario_fusion(args) -> dict:
    """Per-step losses with the fused RMSNorm/SwiGLU/RoPE kernels (the Triton interpreter on CPU) and
    without, and how many kernel launches of each the fused run made."""
    from kernels import _triton

    out = {}
    for stage in args.stages:
        for enabled in (False, True):
            config = {**ds_config(stage, dist.get_world_size()), "fusion": {"enabled": enabled, "min_rows": 0}}
            engine = build(config)
            counts = dsparse.fused_counts(engine.module)
            launches: dict[str, int] = {}
            launch = _triton.DualKernel.launch

            def counted(self, *a, **kw):  # counts, then launches for real
                launches[self.fn.__name__] = launches.get(self.fn.__name__, 0) + 1
                return launch(self, *a, **kw)

            _triton.DualKernel.launch = counted
            try:
                losses = [r["loss"] for r in train(engine, 0, 4)]
            finally:
                _triton.DualKernel.launch = launch
            stacked = [group.values_stacked_in_place for group in dsparse.nn.projection_groups(engine.module)]
            refused = None
            if stage == 3:
                try:
                    dsparse.fuse_projections(engine.module)
                except ValueError as e:
                    refused = str(e)
            out[f"stage{stage}_fused{int(enabled)}"] = {"losses": losses, "fused": counts, "launches": launches,
                                                        "values_stacked_in_place": stacked, "refused": refused}
    return out


def scenario_threads(args) -> dict:
    """Which thread runs the backward: autograd's device thread only with "autograd": {"multithreading": true}."""
    import threading

    out = {"main": threading.get_ident()}
    for threaded in (False, True):
        engine = build({**ds_config(2, dist.get_world_size()), "autograd": {"multithreading": threaded}})
        seen = set()
        engine.sparsity.layers[0].values.register_hook(lambda grad: seen.add(threading.get_ident()))
        train(engine, 0, 1)
        out[f"multithreading{int(threaded)}"] = sorted(seen)
    return out


def scenario_resume(args) -> dict:
    """Save at k, resume in a fresh engine, compare with the uninterrupted run (same world size)."""
    world = dist.get_world_size()
    out = {}
    for stage in args.stages:
        full = train(build(ds_config(stage, world)), 0, 8)
        resumed = []
        for k in (3, 6):  # before and after the adapter switch at step 5
            ck = os.path.join(args.ckpt, f"stage{stage}_k{k}")
            engine = build(ds_config(stage, world))
            train(engine, 0, k)
            engine.save_checkpoint(ck, client_state={"data_step": k})
            engine = build(ds_config(stage, world))
            _, client = engine.load_checkpoint(ck)
            resumed.append({"k": k, "client_step": client["data_step"],
                            "rows": train(engine, client["data_step"], 8)})
        out[f"stage{stage}"] = {"full": full, "resumed": resumed,
                                "projection_groups": dsparse.fused_counts(engine.module)["projections"]}
    return out


def scenario_save_for_universal(args) -> dict:
    out = {}
    for stage in args.stages:
        engine = build(ds_config(stage, dist.get_world_size()))
        rows = train(engine, 0, 4)
        engine.save_checkpoint(os.path.join(args.ckpt, f"uni_stage{stage}"), client_state={"data_step": 4})
        out[f"stage{stage}"] = {"rows": rows + train(engine, 4, 8)}
    return out


def scenario_load_universal(args) -> dict:
    out = {}
    for stage in args.stages:  # stage 0 keeps the whole optimizer state per rank: a plain load
        engine = build(ds_config(stage, dist.get_world_size(), universal=stage > 0))
        _, client = engine.load_checkpoint(os.path.join(args.ckpt, f"uni_stage{stage}"))
        out[f"stage{stage}"] = {"rows": train(engine, client["data_step"], 8)}
    return out


def scenario_overflow(args) -> dict:
    """A NaN loss at step 2 (bf16): the step is skipped for dense and sparse parameters alike."""
    out = {}
    for stage in args.stages:
        engine = build(ds_config(stage, dist.get_world_size(), bf16=True))
        train(engine, 0, 2)
        layer = engine.sparsity.layers[0]
        dense = engine.module.model.embed_tokens.weight
        with torch.no_grad():
            before = [layer.values.detach().clone(), dense.detach().clone()] if stage != 3 else []
        lr_before = engine.get_lr()[0]
        rows = train(engine, 2, 3, nan_step=2)
        after = [layer.values.detach(), dense.detach()] if stage != 3 else []
        out[f"stage{stage}"] = {"rows": rows, "unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
                                "lr_unchanged": engine.get_lr()[0] == lr_before,
                                "skipped_steps": engine.skipped_steps,
                                "next": train(engine, 3, 4)}
        if stage in (1, 2):
            out[f"stage{stage}"]["fused_checks"] = fused_checks(engine)
    return out


def fused_checks(engine) -> dict:
    """ZeRO-1/2's fused inf/NaN check and gradient norm against DeepSpeed's own loops on one backward's
    gradients, before and after one entry of one gradient becomes inf; then the step (skipped)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    ids = batch(9, engine.train_micro_batch_size_per_gpu(), 0, 1)
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    groups = range(len(opt.bit16_groups))

    def both(method: str, *group_args) -> list:
        return [[float(getattr(cls, method)(opt, *a)) for cls in (type(opt), DeepSpeedZeroOptimizer)]
                for a in (group_args or [()])]

    norm_args = [(opt.averaged_gradients[i], opt.params_in_partition[i]) for i in groups]
    out = {"optimizer": type(opt).__name__, "norms": both("get_grad_norm_direct", *norm_args),
           "overflow_clean": both("has_overflow_partitioned_grads_serial")}
    grad = next(g for i in groups for g in opt.averaged_gradients[i] if g is not None and g.numel() > 1)
    with torch.no_grad():
        grad.view(-1)[1] = float("inf")
    out.update(overflow_inf=both("has_overflow_partitioned_grads_serial"),
               norms_inf=both("get_grad_norm_direct", *norm_args))
    skipped = engine.skipped_steps
    engine.step()
    out["skipped"] = engine.skipped_steps - skipped
    return out


def scenario_sync_free(args) -> dict:
    """bf16 with torch's fused AdamW: the same steps with DeepSpeed's host checks and sync-free ("step"),
    then a NaN step that the sync-free engine skips on the device."""
    out = {}
    for stage in args.stages:
        config = ds_config(stage, dist.get_world_size(), bf16=True)
        config["optimizer"]["params"]["fused"] = True
        host = build({**config, "step": {"sync_free": False}})
        free = build(config)
        row = {"device_skip": [host.optimizer.device_skip, free.optimizer.device_skip],
               "host": train(host, 0, 2), "free": train(free, 0, 2)}
        layer, dense = free.sparsity.layers[0], free.module.model.embed_tokens.weight
        before = [layer.values.detach().clone(), dense.detach().clone()]
        steps_before = [s["step"].clone() for s in free.optimizer.optimizer.state.values()]
        row["nan"] = train(free, 2, 3, nan_step=2)  # before the adapters start (step 5)
        row["unchanged"] = all(torch.equal(a, b.detach()) for a, b in zip(before, (layer.values, dense)))
        row["adam_steps_unchanged"] = all(torch.equal(a, s["step"]) for a, s in
                                          zip(steps_before, free.optimizer.optimizer.state.values()))
        row["skipped"] = [free.device_skipped_steps, free.skipped_steps]
        row["next"] = train(free, 3, 4)
        row["changed_after"] = not torch.equal(before[0], layer.values.detach())
        row["clip"] = clip_matches(free.optimizer)
        out[f"stage{stage}"] = row
    return out


def clip_matches(opt) -> list[bool]:
    """The device-side unscale-and-clip against DeepSpeed's, for a large, a small, an inf and DeepSpeed's
    invalid (-1) norm."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    grad = torch.randn(64, generator=torch.Generator().manual_seed(0)).to(opt.device)
    same = []
    for norm in (3.0, 0.1, float("inf"), -1.0):
        ours, theirs = grad.clone(), grad.clone()
        type(opt).unscale_and_clip_grads(opt, [ours], torch.tensor(norm, device=opt.device))
        DeepSpeedZeroOptimizer.unscale_and_clip_grads(opt, [theirs], torch.tensor(norm, device=opt.device))
        same.append(torch.equal(ours, theirs))
    return same


def scenario_mismatch(args) -> dict:
    engine = build(ds_config(2, dist.get_world_size()))
    train(engine, 0, 1)
    ck = os.path.join(args.ckpt, "mismatch")
    engine.save_checkpoint(ck)
    other = build(ds_config(2, dist.get_world_size(), sparsity={
        "mask_change_freq": 2, "total_steps": 8, "adapters": {"rank": 4, "start_step": 5},
        "layer_patterns": [{"match": "down_proj", "pattern": "2:8"}]}))
    try:
        other.load_checkpoint(ck)
        return {"error": None}
    except ValueError as e:
        return {"error": str(e)}


def scenario_plans(args) -> dict:
    """Rank 1 holds MVUE weight-gradient plans that fall back to the exact gradient for every product (as its
    own timing may have said), rank 0 none: which products each rank runs exact, before and after its first
    optimizer step (run with --mvue_dw). With --other_gpu rank 1 says it runs on another GPU, so it keeps
    its own plans."""
    from dsparse.backends import plans
    from dsparse.backends.base import padded_tokens

    if args.other_gpu and dist.get_rank() == 1:
        plans.device_key = lambda: "Another_GPU_cusparselt0"
    engine = build(ds_config(2, dist.get_world_size()))
    tokens = padded_tokens(engine.train_micro_batch_size_per_gpu() * SEQ)
    shapes = [(layer.out_features, layer.in_features) for layer in engine.sparsity.layers]
    plans.ensure_loaded()
    if dist.get_rank() == 1:
        for out, inp in shapes:
            plans.set_plan("dw_mvue", tokens, out, inp, torch.float32, plans.Plan(dense=True))

    def exact() -> list[bool]:
        return [not plans.mvue_pays(tokens, out, inp, torch.float32) for out, inp in shapes]

    before = exact()
    first = train(engine, 0, 1)
    after = exact()
    rows = first + train(engine, 1, 3)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"before": before, "after": after})
    return {"ranks": gathered, "rows": rows}


SCENARIOS = {name.removeprefix("scenario_"): fn for name, fn in globals().items() if name.startswith("scenario_")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt", default="/tmp/dsparse_ckpt")
    parser.add_argument("--stages", default="0,1,2,3", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--mvue_dw", action="store_true", help="MVUE weight gradients in the sparse layers")
    parser.add_argument("--projections", action="store_true", help="group q/k/v and gate/up (fusion.projections)")
    parser.add_argument("--other_gpu", action="store_true", help="rank 1 reports another GPU (scenario plans)")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    OPTIONS.update(bf16=args.bf16, backend=args.backend, mvue_dw=args.mvue_dw, projections=args.projections)
    deepspeed.init_distributed(auto_mpi_discovery=True, distributed_port=int(os.environ.get("MASTER_PORT", 29500)))
    result = SCENARIOS[args.scenario](args)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"world_size": dist.get_world_size(), **result}, f, indent=1)
    end_process()  # not a return: see dsparse.process


if __name__ == "__main__":
    main()
