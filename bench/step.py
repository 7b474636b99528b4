"""End-to-end DeepSpeed training step, dense vs dsparse, same config, same GPU(s).

One process group per mode (peak memory must not mix), e.g. on one GPU::

    for m in dense sparse; do deepspeed --num_gpus 1 bench/step.py --mode $m --out /tmp/step_$m.json; done
    python -m bench.step --merge /tmp/step_dense.json /tmp/step_sparse.json --result bench/results/engine_h100.json

Each run builds the model from a preset (random weights, random tokens), trains
``--warmup`` steps, then times ``--steps`` optimizer steps (median, CUDA-synchronised after
each), then as many back to back (one sync at the end: a training loop's throughput), and
records peak GPU memory and dsparse's memory report. ``--merge`` writes all runs and
each one's ratios against the dense run of the same kind (dense / sparse for time,
sparse / dense for memory; ``--grad_ckpt`` runs against the dense ``--grad_ckpt`` run, ``--fusion off``
runs against the unfused dense run, ``--autograd_threads`` runs against the dense one) to one JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# caching-allocator counters over the timed steps: cudaMalloc/cudaFree calls and device-wide syncs
# stall the host, and with it the GPU
ALLOCATOR_EVENTS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")


def run(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    import dsparse
    from bench.common import environment, host_profile
    from dsparse.backends import plans
    from dsparse.models import build_model

    deepspeed.init_distributed()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    with torch.device("cuda", torch.cuda.current_device()):  # initialise on the GPU: minutes faster at 1B+
        model = build_model(args.model, args.vocab, args.seq_len)
    if args.grad_ckpt:  # activations recomputed in backward: weights and optimizer state dominate memory
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.layers:
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
    config = {
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": args.grad_accum,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": args.zero, "overlap_comm": args.overlap_comm == "on",
                              "contiguous_gradients": True,
                              "reduce_bucket_size": 200_000_000, "allgather_bucket_size": 200_000_000},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.1, "torch_adam": True,
                                                  "fused": True}},
        "steps_per_print": 10**9,
        "fusion": {"enabled": args.fusion != "off", "rope": args.fusion != "no-rope",
                   "projections": args.projections == "on", "swiglu_mvue": args.swiglu_mvue == "on"},
        "autograd": {"multithreading": args.autograd_threads},
        # --host_syncs off: no host read in the ZeRO step, no device sync in DeepSpeed's throughput timer
        "step": {"sync_free": args.host_syncs == "off"},
        "timers": {"throughput": {"synchronized": args.host_syncs == "on"}},
    }
    if args.mode != "dense":
        config["sparsity"] = {"backend": "cusparselt", "mask_change_freq": 100, "double_prune": args.mode != "static",
                              "mvue_dw": args.mvue_dw}
    engine, *_ = dsparse.initialize(model=model, config=config)
    device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=device).manual_seed(dist.get_rank())

    def mark(marks: list[tuple[float, float]] | None) -> None:
        if marks is not None:  # wall clock, and this thread's CPU time (less than wall: it waited)
            marks.append((time.perf_counter(), time.thread_time()))

    def step(marks: list[tuple[float, float]] | None = None) -> float:
        """One optimizer step: ``--grad_accum`` micro-batches (the phases' marks fall in the last one)."""
        for micro in range(args.grad_accum):
            last = marks if micro == args.grad_accum - 1 else None
            ids = torch.randint(0, args.vocab, (args.micro_batch_size, args.seq_len), device=device, generator=gen)
            loss = engine(input_ids=ids, labels=ids).loss
            mark(last)
            engine.backward(loss)
            mark(last)
            engine.step()
        return loss

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    alloc_before = torch.cuda.memory_stats()
    # per step and phase, the host's wall and CPU milliseconds to issue it (no syncs in between), then
    # its wait for the GPU: a wait near zero means the GPU, not the host, was the one waiting
    phases = ("forward", "backward", "step", "wait_for_gpu")
    host_steps: dict[str, list[float]] = {f"{phase}_{kind}": [] for phase in phases for kind in ("ms", "cpu_ms")}
    times = []
    for _ in range(args.steps):
        marks = []
        mark(marks)
        step(marks)
        mark(marks)
        torch.cuda.synchronize()
        mark(marks)
        times.append(marks[-1][0] - marks[0][0])
        for phase, a, b in zip(phases, marks, marks[1:]):
            host_steps[f"{phase}_ms"].append(round(1e3 * (b[0] - a[0]), 3))
            host_steps[f"{phase}_cpu_ms"].append(round(1e3 * (b[1] - a[1]), 3))
    step_s = sorted(times)[len(times) // 2]
    start = time.perf_counter()  # then as a training loop runs: back to back, one sync at the end
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    back_to_back_s = (time.perf_counter() - start) / args.steps
    host_ms = {phase: sorted(host_steps[f"{phase}_ms"])[len(times) // 2] for phase in phases}
    alloc_after = torch.cuda.memory_stats()
    allocator = {key: alloc_after.get(key, 0) - alloc_before.get(key, 0) for key in ALLOCATOR_EVENTS}
    allocator["reserved_peak_gib"] = alloc_after.get("reserved_bytes.all.peak", 0) / 2**30
    profile = None
    if args.profile:  # after the timing: the profiler's own cost must not reach the step times
        from torch.profiler import ProfilerActivity, profile as torch_profile

        from bench.common import kernel_breakdown

        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.profile):
                step()
            torch.cuda.synchronize()
        profile = kernel_breakdown(prof, args.profile)
    host_times = host_profile(step, args.host_profile) if args.host_profile else None
    tokens = args.micro_batch_size * args.seq_len * dist.get_world_size() * args.grad_accum
    result = {"mode": args.mode, "mvue_dw": args.mvue_dw and args.mode != "dense", "grad_ckpt": args.grad_ckpt, "fused": args.fusion != "off",
              "fused_blocks": dsparse.fused_counts(engine.module), "overlap_comm": args.overlap_comm == "on",
              "autograd_multithreading": args.autograd_threads, "model": args.model, "layers": args.layers or model.config.num_hidden_layers,
              "zero_stage": args.zero, "gpus": dist.get_world_size(), "micro_batch_size": args.micro_batch_size,
              "grad_accum": args.grad_accum, "swiglu_mvue": args.swiglu_mvue == "on",
              "seq_len": args.seq_len, "step_s_median": step_s, "step_s_all": times,  # in step order
              "step_s_back_to_back": back_to_back_s, "host_syncs": args.host_syncs == "on",
              "tokens_per_s": tokens / step_s, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
              "memory_report": dsparse.memory_report(engine), "allocator_events": allocator,
              "host_issue_ms": host_ms, "host_issue_by_step": host_steps,
              "operand_refresh_replays": engine.sparsity.refresh_operands.replays,
              "plans": plans.chosen(),  # how each sparse product ran (cuSPARSELt algorithm, fused dW tile, ...)
              "params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())}
    if profile is not None:
        result["gpu_profile"] = profile
    if host_times is not None:
        result["host_profile"] = host_times
    if dist.get_rank() == 0:
        result["environment"] = environment()
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"{args.mode}: {step_s * 1e3:.1f} ms/step ({back_to_back_s * 1e3:.1f} back to back), "
              f"{tokens / step_s:.0f} tokens/s, "
              f"peak {result['peak_memory_gib']:.2f} GiB", flush=True)


def _label(row: dict) -> str:
    """A run's name in the merged result: its mode, ``+grad_ckpt`` when activations were recomputed,
    ``+mvue`` with MVUE weight gradients, ``+unfused`` without the fused RMSNorm/SwiGLU/RoPE kernels, ``+no-rope`` with RMSNorm/SwiGLU only
    (every fused run from before RoPE was), ``+proj`` with q/k/v and gate/up as one product each (runs from
    before the option kept them apart), ``+threaded`` with backward on autograd's device thread
    (torch's default, and every run from before the flag), ``+no-overlap`` without ZeRO's overlap_comm,
    ``+host-syncs`` with DeepSpeed's host-read step checks and synchronized throughput timer (every run from
    before the flag), ``+gaN`` with N micro-batches a step, ``+mvue-apart`` with gate/up's MVUE operand
    written by a pass of its own (not by SwiGLU's backward), ``xN`` GPUs."""
    threaded = row.get("autograd_multithreading", True)
    fused = row.get("fused", False)
    return (row["mode"] + ("+mvue" if row.get("mvue_dw") and row["mode"] != "dense" else "")
            + ("+grad_ckpt" if row.get("grad_ckpt") else "")
            + ("+unfused" if not fused else "+no-rope" if not row.get("fused_blocks", {}).get("rope") else "")
            + ("+proj" if row.get("fused_blocks", {}).get("projections") else "")
            + ("+threaded" if threaded else "") + ("+no-overlap" if row.get("overlap_comm") is False else "")
            + ("+host-syncs" if row.get("host_syncs", True) else "")
            + (f"+ga{row['grad_accum']}" if row.get("grad_accum", 1) > 1 else "")
            + ("+mvue-apart" if row.get("mvue_dw") and row["mode"] != "dense" and row.get("swiglu_mvue") is False
               else "")
            + (f"x{row['gpus']}" if row["gpus"] > 1 else ""))


def _pool(rows: list[dict]) -> dict:
    """One run, or repeats of one configuration pooled: the median over all their steps (GPU clocks
    under the power cap vary from run to run), each run's median kept, the highest peak memory."""
    if len(rows) == 1:
        return rows[0]
    steps = sorted(t for row in rows for t in row["step_s_all"])
    pooled = {**rows[0], "step_s_all": [t for row in rows for t in row["step_s_all"]],
              "step_s_median": steps[len(steps) // 2], "repeat_medians": [row["step_s_median"] for row in rows],
              "peak_memory_gib": max(row["peak_memory_gib"] for row in rows)}
    pooled["tokens_per_s"] = rows[0]["tokens_per_s"] * rows[0]["step_s_median"] / pooled["step_s_median"]
    if all("step_s_back_to_back" in row for row in rows):
        pooled["step_s_back_to_back"] = sorted(row["step_s_back_to_back"] for row in rows)[len(rows) // 2]
    return pooled


def merge(paths: list[str], result_path: str) -> None:
    """Write the runs of ``paths`` (repeats of one label pooled) and each one's ratios against its dense run."""
    from bench.common import write_result

    repeats: dict[str, list[dict]] = {}
    for path in paths:
        with open(path) as f:
            row = json.load(f)
        repeats.setdefault(_label(row), []).append(row)
    env = next(row["environment"] for rows in repeats.values() for row in rows if "environment" in row)
    runs = {label: _pool(rows) for label, rows in repeats.items()}
    for row in runs.values():
        row.pop("environment", None)
    ratios = {}
    for label, row in runs.items():
        dense = runs.get(_label({**row, "mode": "dense"}))
        if row["mode"] != "dense" and dense is not None:
            ratios[label] = {"speedup": dense["step_s_median"] / row["step_s_median"],
                             "memory_ratio": row["peak_memory_gib"] / dense["peak_memory_gib"]}
            if "step_s_back_to_back" in row and "step_s_back_to_back" in dense:
                ratios[label]["speedup_back_to_back"] = dense["step_s_back_to_back"] / row["step_s_back_to_back"]
    write_result(result_path, {"measured_environment": env, "runs": runs, "vs_dense": ratios})
    print(json.dumps(ratios, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["dense", "sparse", "static"], default="sparse",
                        help="static: single-pruned 2:4 without double pruning")
    parser.add_argument("--model", default="llama-1b")
    parser.add_argument("--layers", type=int, default=0, help="keep only the first N blocks (0: all)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--micro_batch_size", type=int, default=8)
    parser.add_argument("--swiglu_mvue", choices=["on", "off"], default="on",
                        help="with --mvue_dw: SwiGLU's backward writes gate/up's MVUE operand (fusion.swiglu_mvue)")
    parser.add_argument("--grad_accum", type=int, default=1,
                        help="micro-batches per optimizer step (a step's host phases: forward counts the earlier ones)")
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--mvue_dw", action="store_true",
                        help="sparse weight gradients from an MVUE 2:4 sparsification of dYᵀ (config sparsity.mvue_dw)")
    parser.add_argument("--grad_ckpt", action="store_true",
                        help="activation checkpointing (HF gradient_checkpointing_enable); compared with dense run the same way")
    parser.add_argument("--fusion", choices=["on", "off", "no-rope"], default="on",
                        help="the fused RMSNorm/SwiGLU/RoPE kernels (config section 'fusion'), dense and sparse "
                             "alike; no-rope: RMSNorm and SwiGLU only")
    parser.add_argument("--overlap_comm", choices=["on", "off"], default="on",
                        help="ZeRO's overlap_comm (on CUDA, DeepSpeed 0.19.8 synchronizes the device at every "
                             "gradient-bucket flush with it on)")
    parser.add_argument("--projections", choices=["on", "off"], default="on",
                        help="q/k/v and gate/up as one GEMM each way, dense and sparse alike (config 'fusion': "
                             "{'projections': ...}; only with --fusion on or no-rope)")
    parser.add_argument("--host_syncs", choices=["on", "off"], default="off",
                        help="on: DeepSpeed's host-read inf/NaN and clip checks and its synchronized throughput "
                             "timer (config 'step': {'sync_free': false}); off: none (the dsparse default)")
    parser.add_argument("--autograd_threads", action="store_true",
                        help="run backward on autograd's device thread (torch's default; config 'autograd')")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--profile", type=int, default=0,
                        help="after timing, profile this many steps: GPU time per step by kernel category")
    parser.add_argument("--host_profile", type=int, default=0,
                        help="after timing, run this many steps under cProfile: the host's time by function")
    parser.add_argument("--out", default="step.json")
    parser.add_argument("--merge", nargs="+", default=None, help="merge per-mode JSON files into --result")
    parser.add_argument("--result", default=None)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    if args.grad_accum < 1:
        parser.error(f"--grad_accum is micro-batches per optimizer step: 1 or more, got {args.grad_accum}")
    if args.merge:
        merge(args.merge, args.result)
    else:
        run(args)


if __name__ == "__main__":
    main()
