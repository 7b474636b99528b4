"""Dense vs dsparse (SLoPe) vs static single-pruned 2:4 (vs dsparse with MVUE weight gradients) at
equal tokens: validation loss and speed.

Runs ``launch/pretrain.py`` once per mode with the same model, data, schedule and seed,
then writes ``bench/results/convergence_<gpu>.json`` (each mode's validation curve and
median tokens/s, the final validation-loss gaps) and a PNG of the curves.

    python -m bench.convergence --model gpt2-small --max_steps 1000 --seq_len 512 --micro_batch_size 16
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench.common import gpu_tag, write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {"dense": ["--dense"], "dsparse": [], "static": ["--no_double_prune"], "dsparse_mvue": ["--mvue_dw"]}


def run_mode(mode: str, args: argparse.Namespace, common: list[str]) -> dict:
    out = os.path.join(args.work_dir, mode)
    launcher = [os.path.join(os.path.dirname(sys.executable), "deepspeed")]
    if not os.path.exists(launcher[0]):
        launcher = ["deepspeed"]
    cmd = [*launcher, "--num_gpus", str(args.gpus), os.path.join(ROOT, "launch", "pretrain.py"), *common,
           *MODES[mode], "--output_dir", out, "--no_tensorboard"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train = [r for r in rows if "loss" in r]
    speeds = sorted(r["tokens_per_s"] for r in train[len(train) // 5:])  # after the first fifth (warm-up)
    return {"command": " ".join(cmd), "val": [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r],
            "train": [(r["step"], r["loss"]) for r in train], "tokens": train[-1]["tokens"],
            "tokens_per_s_median": speeds[len(speeds) // 2]}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, res in results.items():
        ax.plot(*zip(*res["val"]), "o-", label=f"{mode} ({res['tokens_per_s_median']:.0f} tok/s)")
    ax.set_xlabel("optimizer step (equal tokens per step)")
    ax.set_ylabel("validation loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--max_steps", type=int, default=1000)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--micro_batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--max_mb", type=float, default=24.0)
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--modes", default="dense,dsparse,static")
    parser.add_argument("--work_dir", default="runs/convergence")
    parser.add_argument("--out", default=None, help="result JSON (default bench/results/convergence_<gpu>.json)")
    args = parser.parse_args()
    common = ["--model", args.model, "--max_steps", str(args.max_steps), "--seq_len", str(args.seq_len),
              "--micro_batch_size", str(args.micro_batch_size), "--lr", str(args.lr), "--eval_every",
              str(args.eval_every), "--save_every", str(10**9), "--max_mb", str(args.max_mb), "--log_every", "10"]
    result = args.out or os.path.join(ROOT, "bench", "results", f"convergence_{gpu_tag()}.json")
    png = result.removesuffix(".json") + ".png"
    results: dict[str, dict] = {}
    for mode in args.modes.split(","):  # the result is rewritten after every mode: a cut-off run keeps what it has
        results[mode] = run_mode(mode, args, common)
        dense_final = results["dense"]["val"][-1][1] if "dense" in results else None
        gaps = {m: res["val"][-1][1] - dense_final for m, res in results.items()
                if dense_final is not None and m != "dense"}
        plot(results, png)
        write_result(result, {"runs": results, "final_val_loss_gap_vs_dense": gaps, "plot": os.path.relpath(png, ROOT)})
    print(json.dumps(gaps, indent=1))


if __name__ == "__main__":
    main()
