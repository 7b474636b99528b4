"""SLoPe pretraining of a causal LM with dsparse on DeepSpeed.

    deepspeed launch/pretrain.py                      # tiny LLaMA on the embedded corpus (CPU or all GPUs)
    deepspeed launch/pretrain.py --model llama-1b --seq_len 2048 --max_steps 20000 --output_dir runs/1b
    mpiexec -n 16 python launch/pretrain.py ...       # MPI start; ranks found through mpi4py

Phases (logged in metrics.jsonl as `phase`): optional dense warm-up, 2:4 double-pruned sparse
training, and lazy low-rank adapters for the last part (--adapter_start). Without
--deepspeed_config the run uses ds_configs/zero1_fp32.json on CPU and zero2_bf16.json on GPU;
command-line flags override the config's batch size, optimizer, schedule and sparsity.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

import dsparse  # noqa: E402
from dsparse.data import build_data  # noqa: E402
from dsparse.engine import load_ds_config  # noqa: E402
from dsparse.models import PRESETS, build_model, model_config  # noqa: E402
from dsparse.process import end_process  # noqa: E402
from dsparse.run_log import RunLog  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="llama-tiny", help=f"preset ({', '.join(PRESETS)}) or a HF config.json path")
    p.add_argument("--dataset", default="default",
                   help="'default' (the Python standard library's sources), a local txt/jsonl/parquet file or "
                        "directory, or a datasets hub name")
    p.add_argument("--tokenizer", default=None, help="local HF tokenizer dir; default: a BPE trained on the corpus")
    p.add_argument("--vocab_size", type=int, default=8192, help="vocabulary of the trained tokenizer")
    p.add_argument("--max_mb", type=float, default=None, help="cap on training text in MB (default corpus: 8)")
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--max_steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--micro_batch_size", type=int, default=None, help="per rank (default: from the config)")
    p.add_argument("--grad_accum", type=int, default=None, help="gradient accumulation steps (default: config)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: config)")
    p.add_argument("--warmup_steps", type=int, default=None, help="LR warm-up steps (default: 10%% of max_steps)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output_dir", default="runs/default")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--eval_every", type=int, default=50, help="optimizer steps between validation passes")
    p.add_argument("--eval_batches", type=int, default=20, help="validation micro-batches per rank")
    p.add_argument("--save_every", type=int, default=100, help="optimizer steps between checkpoints")
    p.add_argument("--log_every", type=int, default=1, help="optimizer steps between metrics rows")
    p.add_argument("--dense", action="store_true", help="train without sparsity (the comparison baseline)")
    p.add_argument("--no_double_prune", action="store_true",
                   help="static single-pruned 2:4: dX uses the forward mask's transpose (a dense GEMM)")
    p.add_argument("--mvue_dw", action="store_true",
                   help="weight gradients from an unbiased 2:4 (MVUE) sparsification of dY (a sparse GEMM on GPUs)")
    p.add_argument("--pattern", default=None, help="N:M pattern (default: config's, 2:4)")
    p.add_argument("--dense_warmup_steps", type=int, default=0, help="dense steps before pruning")
    p.add_argument("--adapter_start", type=float, default=0.99,
                   help="fraction of max_steps after which lazy low-rank adapters train (>= 1: none)")
    p.add_argument("--adapter_rank", type=int, default=None, help="adapter rank (default: 1.56%% of hidden)")
    p.add_argument("--mask_change_freq", type=int, default=None, help="steps between W̃ᵀ mask changes (default 100)")
    p.add_argument("--backend", default=None, help="auto, reference or cusparselt (default: config's)")
    p.add_argument("--no_tensorboard", action="store_true", help="do not write TensorBoard events")
    p.add_argument("--deepspeed_config", default=None, help="DeepSpeed JSON config (with a 'sparsity' section)")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help="set by the deepspeed launcher")
    args = p.parse_args(argv)
    if args.max_steps < 1:
        p.error("--max_steps must be >= 1")
    return args


def resolve_config(args: argparse.Namespace) -> dict:
    """The DeepSpeed config of this run: the given or default file, overridden by the flags."""
    default = "zero2_bf16.json" if torch.cuda.is_available() else "zero1_fp32.json"
    cfg = load_ds_config(args.deepspeed_config or os.path.join(ROOT, "ds_configs", default))
    cfg.pop("train_batch_size", None)
    if args.micro_batch_size is not None:
        cfg["train_micro_batch_size_per_gpu"] = args.micro_batch_size
    if args.grad_accum is not None:
        cfg["gradient_accumulation_steps"] = args.grad_accum
    cfg.setdefault("train_micro_batch_size_per_gpu", 8)
    if args.lr is not None:
        cfg.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True}})["params"]["lr"] = args.lr
    sched = cfg.get("scheduler", {}).get("params")
    if sched is not None:
        sched["total_num_steps"] = args.max_steps
        sched["warmup_num_steps"] = args.warmup_steps if args.warmup_steps is not None else max(1, args.max_steps // 10)
    if not args.no_tensorboard:
        cfg["tensorboard"] = {"enabled": True, "output_path": os.path.join(args.output_dir, "tensorboard"),
                              "job_name": "pretrain"}
    sparsity = cfg.setdefault("sparsity", {})
    if args.dense:
        sparsity["enabled"] = False
    sparsity["total_steps"] = args.max_steps
    for flag, key in ((args.pattern, "pattern"), (args.mask_change_freq, "mask_change_freq"),
                      (args.backend, "backend")):
        if flag is not None:
            sparsity[key] = flag
    sparsity["dense_warmup_steps"] = args.dense_warmup_steps
    if args.no_double_prune:
        sparsity["double_prune"] = False
    if args.mvue_dw:
        sparsity["mvue_dw"] = True
    if args.adapter_start >= 1.0:
        sparsity.pop("adapters", None)
    else:
        adapters = sparsity.setdefault("adapters", {})
        adapters["start"] = args.adapter_start
        if args.adapter_rank is not None:
            adapters["rank"] = args.adapter_rank
    return cfg


def mean_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


@torch.no_grad()
def evaluate(engine, val_loader, device: torch.device) -> float:
    engine.eval()
    total, count = 0.0, 0
    for batch in val_loader:
        total += engine(**{k: v.to(device) for k, v in batch.items()}).loss.float().item()
        count += 1
    engine.train()
    return mean_over_ranks(total / max(count, 1), device)


class Preemption:
    """SIGTERM / SIGUSR1 (a cluster's preemption notice) ask for a checkpoint and a clean exit."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


def step_stats(losses: list[torch.Tensor], preemption: Preemption) -> tuple[float, bool]:
    """Mean loss over ranks, and whether any rank was told to stop: one all-reduce per step."""
    stats = torch.stack([torch.stack(losses).mean(), torch.tensor(float(preemption.requested),
                                                                 device=losses[0].device)]).double()
    dist.all_reduce(stats)
    return stats[0].item() / dist.get_world_size(), bool(stats[1].item() > 0)


def train(args: argparse.Namespace) -> None:
    model_config(args.model, args.seq_len)  # refuse a bad --model or --seq_len before any work
    deepspeed.init_distributed(auto_mpi_discovery=True)
    args.local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank))  # MPI discovery sets it only now
    if torch.cuda.is_available():
        torch.cuda.set_device(args.local_rank)  # before the first NCCL collective (the data barrier)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    cfg = resolve_config(args)
    micro = cfg["train_micro_batch_size_per_gpu"]
    ga = cfg.get("gradient_accumulation_steps", 1)
    os.makedirs(args.output_dir, exist_ok=True)
    train_loader, val_loader, tokenizer = build_data(
        args.dataset, args.tokenizer, args.seq_len, rank=rank, world_size=world, micro_batch_size=micro,
        seed=args.seed, max_mb=args.max_mb, vocab_size=args.vocab_size, eval_max_batches=args.eval_batches,
        barrier=dist.barrier)
    model = build_model(args.model, len(tokenizer), args.seq_len, seed=args.seed)
    engine, *_ = dsparse.initialize(args=args, model=model, config=cfg)
    log = RunLog(args.output_dir, enabled=rank == 0, monitor=engine.monitor)
    ckpt_dir = os.path.join(args.output_dir, "checkpoints")
    if rank == 0:
        with open(os.path.join(args.output_dir, "config.json"), "w") as f:
            json.dump({"args": vars(args), "deepspeed": cfg, "world_size": world}, f, indent=1)
        model.config.save_pretrained(os.path.join(args.output_dir, "hf_config"))  # for dsparse.export
    if args.resume and os.path.exists(os.path.join(ckpt_dir, "latest")):
        _, client = engine.load_checkpoint(ckpt_dir)
        train_loader.load_state_dict(client["data"])
        print(f"[dsparse] resumed at step {engine.global_steps} from {ckpt_dir}", flush=True)
    elif args.resume:
        print(f"[dsparse] --resume: no checkpoint in {ckpt_dir}; starting fresh", flush=True)

    def save() -> None:
        engine.save_checkpoint(ckpt_dir, client_state={"data": train_loader.state_dict()})

    tokens_per_step = micro * ga * world * args.seq_len
    preemption = Preemption()
    progress = None
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=args.max_steps, initial=engine.global_steps, desc=engine.sparsity.phase,
                        dynamic_ncols=True)
    if rank == 0:
        print(f"[dsparse] {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M trainable numbers, "
              f"{len(engine.sparsity.layers)} sparse layers, phase {engine.sparsity.phase}, "
              f"{world} rank(s), {tokens_per_step} tokens/step", flush=True)
    last_time, phase = time.perf_counter(), engine.sparsity.phase
    while engine.global_steps < args.max_steps:
        step_phase, step_lr = engine.sparsity.phase, engine.get_lr()[0]
        losses = []
        for _ in range(ga):
            batch = {k: v.to(device) for k, v in next(train_loader).items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
        step = engine.global_steps
        loss_value, stop = step_stats(losses, preemption)
        if step % args.log_every == 0 or step == args.max_steps:
            now = time.perf_counter()
            row = {"step": step, "loss": loss_value, "lr": step_lr, "tokens": step * tokens_per_step,
                   "tokens_per_s": tokens_per_step * args.log_every / (now - last_time), "phase": step_phase}
            if engine.fp16_enabled():
                row["loss_scale"] = float(engine.optimizer.cur_scale)
            last_time = now
            log.write(row)
            if progress is not None:
                progress.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if progress is not None:
            progress.update(1)
            progress.set_description(engine.sparsity.phase)
        if engine.sparsity.phase != phase:
            phase = engine.sparsity.phase
            if rank == 0:
                print(f"\n[dsparse] step {step}: entering phase '{phase}'", flush=True)
        if step % args.eval_every == 0 or step == args.max_steps:
            val = evaluate(engine, val_loader, device)
            log.write({"step": step, "val_loss": val, "val_ppl": math.exp(min(val, 50))})
            log.plot()
        if step % args.save_every == 0 or step == args.max_steps:
            save()
        if stop:  # every rank agrees: the flag went through the all-reduce
            save()
            if rank == 0:
                print(f"\n[dsparse] preempted: checkpoint saved at step {step}; rerun with --resume", flush=True)
            break
    if progress is not None:
        progress.close()
    log.plot()
    if rank == 0:
        print(f"[dsparse] done: {engine.global_steps} steps; outputs in {args.output_dir}", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        train(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: one line (from rank 0), no traceback
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(2)  # end now: peers blocked in a collective are then stopped by the launcher
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    main()
    end_process()  # no interpreter finalization racing gloo's threads: see dsparse.process
