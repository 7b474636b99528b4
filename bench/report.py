"""Render the README's results section from bench/results/*.json (run after any benchmark).

    python -m bench.report          # rewrites the block between the results markers in README.md
"""
from __future__ import annotations

import glob
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _load(pattern: str) -> list[tuple[str, dict]]:
    return [(os.path.basename(p), json.load(open(p))) for p in sorted(glob.glob(os.path.join(ROOT, pattern)))]


def _env(env: dict) -> str:
    when = f", {env['utc'][:10]}" if "utc" in env else ""  # recorded since session 17
    if not env.get("gpu"):
        return f"CPU, torch {env.get('torch')}, triton {env.get('triton')}{when}"
    return (f"{env.get('gpu')}, torch {env.get('torch')}, cuSPARSELt {env.get('cusparselt')}, "
            f"triton {env.get('triton')}{when}")


def _provenance(data: dict) -> list[str]:
    """A result's provenance note (how and with what code it was measured), as italic lines, if it has one."""
    return ["", f"_{data['provenance']}_"] if "provenance" in data else []


def layer_table() -> list[str]:
    lines = []
    for name, data in _load("bench/results/layer_*.json"):
        rows = [r for r in data["rows"] if "speedup_sparse_tuned" in r]
        if not rows:
            continue
        # runs from before session 17 recorded no args: they ran the backward on torch's autograd thread
        threads = data.get("args", {}).get("autograd_threads", True)
        backward = "torch's threaded backward" if threads else "backward on the calling thread, as the engine runs it"
        lines += [f"**Layer** (`{name}`; {_env(data['environment'])}): dense time / sparse time, same run; whole "
                  f"step with {backward}; \"kernels alone\": the whole step replayed as a CUDA graph (recorded since "
                  "session 18), so the host's share shows as the gap to the eager step",
                  *_provenance(data),
                  "", "| in x out | tokens | dtype | fwd | dX | dW | whole step | whole step, kernels alone | MVUE dW "
                      "| MVUE step |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            s = r["speedup_sparse_tuned"]
            extra = [f"{s[k]:.2f}x" if k in s else "-" for k in ("step_graph", "dw_mvue", "step_mvue")]
            if r["sparse_tuned"].get("dw_mvue_plan", {}).get("dense"):
                extra[-1] += " (exact dW)"
            fused = " (fused)" if r["sparse_tuned"].get("dw_plan", {}).get("dw_tile") else ""
            lines.append(f"| {r['in']}x{r['out']} | {r['tokens']} | {r['dtype']} | {s['fwd']:.2f}x | {s['dx']:.2f}x "
                         f"| {s['dw']:.2f}x{fused} | {s['step']:.2f}x | {' | '.join(extra)} |")
        if any(r["sparse_tuned"].get("dw_plan", {}).get("dw_tile") for r in rows):
            lines += ["", "(fused): the exact dW's plan picked the Triton GEMM that keeps the kept entries in its "
                          "epilogue (`kernels.weight_grad_kept`); elsewhere cuBLAS's dense product, then a gather."]
        if any(r["sparse_tuned"].get("dw_mvue_plan", {}).get("dense") for r in rows):
            lines += ["", "(exact dW): the MVUE dW's plan measured the exact dW faster here (compressing S(dYᵀ) costs "
                          "more than its sparse GEMM saves), so a layer with `mvue_dw` takes the exact one."]
        lines.append("")
    return lines


def kernel_table() -> list[str]:
    lines = []
    for name, data in _load("bench/results/kernels_*.json"):
        lines += [f"**Kernels** (`{name}`; {_env(data['environment'])})",
                  *_provenance(data), "",
                  "| what | shape | Triton | torch | speedup |", "|---|---|---|---|---|"]
        for r in data.get("refresh", []):
            lines.append(f"| W̃ᵀ + W refresh after a step | {r['in']}x{r['out']} {r['dtype']} | "
                         f"{r['full_refresh_kernel_ms']:.3f} ms | {r['full_refresh_torch_ms']:.3f} ms | "
                         f"{r['full_refresh_speedup']:.1f}x |")
        for r in data.get("mvue", []):
            lines.append(f"| MVUE S(dYᵀ) written compressed (vs a copy of dY: the bandwidth bound) | {r['tokens']} tokens x "
                         f"{r['out']} {r['dtype']} | {r['kernel_ms']:.3f} ms | {r['copy_ms']:.3f} ms | "
                         f"{r['copy_ms'] / r['kernel_ms']:.2f}x |")
        sm = data.get("swiglu_mvue")
        if sm:
            best = f" (best swept {sm['best_ms']:.3f})" if sm["best_ms"] < 0.97 * sm["kernel_ms"] else ""
            lines.append(f"| SwiGLU backward writing gate/up's MVUE S(dYᵀ) compressed, one pass (vs silu_mul_backward, "
                         f"then mvue_compress) | {sm['tokens']} tokens, I = {sm['inter']} {sm['dtype']} | "
                         f"{sm['kernel_ms']:.3f} ms{best} | {sm['two_kernels_ms']:.3f} ms | {sm['speedup']:.2f}x |")
        for r in data.get("skinny", []):
            lines.append(f"| x Aᵀ for few tokens straight from the compressed A (vs F.linear on the dense A; CUDA "
                         f"graph replays) | {r['tokens']} tokens x {r['in']} -> {r['out']} {r['dtype']} | "
                         f"{r['kernel_ms'] * 1e3:.1f} µs | {r['dense_ms'] * 1e3:.1f} µs | {r['speedup']:.2f}x |")
            if "mma_ms" in r:
                best = ", ".join(f"{k} {v}" for k, v in r["mma_best_config"].items())
                lines.append(f"| the same on the sparse tensor cores (kernels.skinny_mma, CUDA C++; {best} "
                             f"best) | {r['tokens']} tokens x {r['in']} -> {r['out']} "
                             f"{r['dtype']} | {r['mma_ms'] * 1e3:.1f} µs | {r['dense_ms'] * 1e3:.1f} µs | "
                             f"{r['mma_speedup']:.2f}x |")
        fused = data.get("fused")
        if fused:
            shape = f"{fused['tokens']} tokens, {fused['hidden']} / {fused['inter']} {fused['dtype']}"
            for what, key in (("RMSNorm fwd+bwd through autograd, eager (vs HF LlamaRMSNorm)", "rms_norm"),
                              ("SwiGLU gate fwd+bwd through autograd, eager (vs silu(g) * u)", "swiglu"),
                              ("RoPE of q and k fwd+bwd through autograd, eager (vs HF's apply_rotary_pos_emb)",
                               "rope")):
                if key + "_speedup" not in fused:  # measured before RoPE was fused
                    continue
                lines.append(f"| {what} | {shape} | {fused[key + '_fused_ms']:.3f} ms | {fused[key + '_hf_ms']:.3f} ms | "
                             f"{fused[key + '_speedup']:.1f}x |")
        lines.append("")
    return lines


def engine_table() -> list[str]:
    lines = []
    for name, data in _load("bench/results/engine_*.json"):
        if "vs_dense" not in data or any("gpu_profile" in run for run in data["runs"].values()):
            continue
        first = next(iter(data["runs"].values()))
        lines += [f"**Training step** (`{name}`; {first['model']}, {first['layers']} layers, ZeRO-{first['zero_stage']} "
                  f"bf16, {first['micro_batch_size']}x{first['seq_len']} tokens per GPU; "
                  f"{_env(data.get('measured_environment') or data['environment'])})",
                  *_provenance(data), "",
                  "| mode | GPUs | step time | tokens/s | peak memory | vs dense |", "|---|---|---|---|---|---|"]
        for mode, run in data["runs"].items():
            ratio = data["vs_dense"].get(mode)
            rel = f"{ratio['speedup']:.2f}x speed, {ratio['memory_ratio']:.2f}x memory" if ratio else "-"
            if ratio and "speedup_back_to_back" in ratio:
                rel += f" ({ratio['speedup_back_to_back']:.2f}x back to back)"
            repeats = run.get("repeat_medians")
            each = f" ({len(repeats)} runs: {', '.join(f'{t * 1e3:.0f}' for t in repeats)})" if repeats else ""
            lines.append(f"| {mode} | {run['gpus']} | {run['step_s_median'] * 1e3:.0f} ms{each} | {run['tokens_per_s']:.0f} | "
                         f"{run['peak_memory_gib']:.1f} GiB | {rel} |")
        lines.append("")
    return lines


def profile_table() -> list[str]:
    """GPU milliseconds per step by kernel category, from the ``--profile`` runs of bench/step.py."""
    from bench.common import category_order

    lines = []
    for name, data in _load("bench/results/engine_*_profile.json"):
        runs = data["runs"]
        order = category_order(list(runs.values()))
        first = next(iter(runs.values()))
        png = f"bench/results/{name.removesuffix('.json')}.png"
        chart = f", chart `{png}`" if os.path.exists(os.path.join(ROOT, png)) else ""
        lines += [f"**Where a step's GPU time goes** (`{name}`{chart}; {first['model']}, {first['micro_batch_size']}x"
                  f"{first['seq_len']} tokens, ZeRO-{first['zero_stage']} bf16; "
                  f"{_env(data.get('measured_environment') or data['environment'])}): ms per step, torch.profiler",
                  *_provenance(data), "",
                  "| run | step (wall) | GPU busy | GPU idle | " + " | ".join(order) + " |",
                  "|---" * (len(order) + 4) + "|"]
        for label, run in runs.items():
            prof = run["gpu_profile"]
            cells = [f"{prof['by_category_ms'].get(c, 0.0):.1f}" for c in order]
            idle = f"{prof['idle_ms']:.0f}" if "idle_ms" in prof else "-"  # runs from before gaps were recorded
            lines.append(f"| {label} | {run['step_s_median'] * 1e3:.0f} | {prof['gpu_busy_ms']:.0f} | {idle} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    return lines


def infer_table() -> list[str]:
    lines = []
    for name, data in _load("bench/results/infer_*.json"):
        a = data["args"]
        fused = ", HF's RMSNorm/SwiGLU/RoPE"
        if a.get("fusion") == "on":  # runs from before RoPE was fused did not record their blocks
            blocks = data["results"]["dense"].get("fused_blocks", {"rms_norm": 1, "swiglu": 1})
            fused = ", fused " + "/".join(name for key, name in (("rms_norm", "RMSNorm"), ("swiglu", "SwiGLU"),
                                                                 ("rope", "RoPE"), ("projections", "projections"))
                                      if blocks.get(key))
        folds = a.get("fold", "off").split(",")  # runs from before folding added them after the product
        adapters = {("on",): "folded into the sparse operand", ("off",): "multiply-added onto the sparse output"}.get(
            tuple(folds), "folded into the sparse operand, `_added` rows multiply-added onto its output")
        logits = "last position's logits" if a.get("logits") == "last" else "every position's logits"
        if a.get("graph_fusion") == "on":  # since session 17: captured decoding steps run the fused kernels too
            fused += " (decoding steps too, under CUDA graphs)"
        lines += [f"**Inference** (`{name}`; {a['model']}, batch {a['batch']}, prefill {a['prompt']} tokens "
                  f"({logits}), decode {a['new_tokens']} tokens{fused}; adapters {adapters}; "
                  f"{_env(data['environment'])})",
                  *_provenance(data),
                  "", "| model | prefill | decode (generate) | decode (CUDA graphs) | decoding step (CUDA graphs) "
                  "| weight memory |", "|---|---|---|---|---|---|"]
        for variant, r in data["vs_dense"].items():
            # CUDA-graph decoding since session 15, its step alone (first token's time taken off) since session 17
            graphs, step = (f"{r[key]:.2f}x" if key in r else "-"
                            for key in ("decode_graph_speedup", "decode_graph_step_speedup"))
            lines.append(f"| {variant} | {r['prefill_speedup']:.2f}x | {r['decode_speedup']:.2f}x | {graphs} | "
                         f"{step} | {r['weight_memory_ratio']:.2f}x |")
        lines.append("")
    return lines


def convergence_table() -> list[str]:
    lines = []
    for name, data in _load("bench/results/convergence_*.json"):
        runs = data["runs"]
        lines += [f"**Convergence** (`{name}`, plot `{data['plot']}`; {_env(data['environment'])}): equal tokens", "",
                  "| mode | tokens | final val loss | gap vs dense | tokens/s |", "|---|---|---|---|---|"]
        for mode, run in runs.items():
            gap = data["final_val_loss_gap_vs_dense"].get(mode)
            lines.append(f"| {mode} | {run['tokens']} | {run['val'][-1][1]:.3f} | "
                         f"{'-' if gap is None else f'{gap:+.3f}'} | {run['tokens_per_s_median']:.0f} |")
        lines.append("")
    return lines


def fp8_table() -> list[str]:
    lines = []
    for name, data in _load("bench/results/fp8_*.json"):
        lines += [f"**FP8 e4m3 products** (`{name}`; {_env(data['environment'])}): dense bf16 time / time, "
                  "same run (torch's `_cslt_sparse_mm`, not yet used in training)", "",
                  "| in x out | tokens | 2:4 bf16 | dense FP8 | 2:4 FP8 | 2:4 FP8, scaled | 2:4 FP8 + cast of X |",
                  "|---|---|---|---|---|---|---|"]
        for r in data["rows"]:
            s = r["speedup_vs_dense_bf16"]
            lines.append(f"| {r['in']}x{r['out']} | {r['tokens']} | {s['sparse_bf16']:.2f}x | {s['dense_fp8']:.2f}x | "
                         f"{s['sparse_fp8']:.2f}x | {s['sparse_fp8_scaled']:.2f}x | {s['sparse_fp8_with_cast']:.2f}x |")
        lines.append("")
    return lines


def _best_tile_cells(timings: list[dict]) -> str:
    """The fastest fused tile's time, its ratio to cuBLAS + gather and its name: the finals' times where a
    tile reached them, else the eager screen's (marked), else none ran (errors)."""
    for key, mark in (("ms", ""), ("screen_ms", " (screen)")):
        fused = [t for t in timings if t.get("dw_tile") and key in t]
        unfused = next((t for t in timings if not t.get("dw_tile") and key in t), None)
        if fused and unfused:
            best = min(fused, key=lambda t: t[key])
            return f"{best[key]:.3f} ms{mark} | {unfused[key] / best[key]:.2f}x{mark} | {best['dw_tile']}"
    return "- | - | none ran"


def weight_grad_table() -> list[str]:
    """The exact weight gradient's tuning (``bench.tune --roles dw``): cuBLAS + gather against the fused tiles."""
    lines = []
    for name, data in _load("bench/results/tune_*.json"):
        rows = [r for r in data.get("products", []) if r["role"] == "dw"]
        if not rows:
            continue
        lines += [f"**Exact weight gradient at the kept entries** (`{name}`; {_env(data['environment'])}): "
                  "cuBLAS's dense dYᵀX then the gather of the kept half, against `kernels.weight_grad_kept` "
                  "(one Triton GEMM, the kept entries picked in its epilogue) on its fastest tile; the plan takes "
                  "the faster", "",
                  "| in x out | tokens | dtype | cuBLAS + gather | fused, best tile | speedup | tile |",
                  "|---|---|---|---|---|---|---|"]
        cells = [_best_tile_cells(r["timings"]) for r in rows]
        lines += [f"| {r['n']}x{r['k']} | {r['tokens']} | {r['dtype']} | {r['default_ms']:.3f} ms | {c} |"
                  for r, c in zip(rows, cells)]
        if any("(screen)" in c for c in cells):
            lines += ["", "(screen): no tile came within 10% of cuBLAS + gather in the eager screen, so none was "
                      "timed again; the ratio is of the two screens."]
        lines.append("")
    return lines


def mvue_grad_table() -> list[str]:
    """The MVUE weight gradient's tuning (``bench.tune --roles dw_mvue``): its best algorithm, whole, against the
    exact gradient on that one's plan (the fallback)."""
    lines = []
    for name, data in _load("bench/results/tune_*.json"):
        rows = [r for r in data.get("products", []) if r["role"] == "dw_mvue" and r["dense_ms"] == r["dense_ms"]]
        if not rows:  # (files from before the fallback timed the product alone, and no exact gradient: NaN)
            continue
        lines += [f"**MVUE weight gradient against the exact one** (`{name}`; {_env(data['environment'])}): "
                  "`S(dYᵀ)` compressed by `kernels.mvue_compress`, cuSPARSELt's product on its best algorithm and "
                  "the gather of the kept entries, against the exact gradient on its own plan; where the exact one "
                  "is faster, layers with `mvue_dw` take it", "",
                  "| in x out | tokens | dtype | exact | MVUE, best algorithm | MVUE speedup | runs |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            mvue = min(t["ms"] for t in r["timings"] if "ms" in t and not t["dense"])
            lines.append(f"| {r['n']}x{r['k']} | {r['tokens']} | {r['dtype']} | {r['dense_ms']:.3f} ms | {mvue:.3f} ms "
                         f"| {r['dense_ms'] / mvue:.2f}x | {'exact' if r['plan']['dense'] else 'MVUE'} |")
        lines.append("")
    return lines


def render() -> str:
    body = (engine_table() + profile_table() + infer_table() + convergence_table() + layer_table() +
            weight_grad_table() + mvue_grad_table() + kernel_table() + fp8_table())
    return "\n".join(body or ["No GPU results yet: run the benchmarks in bench/ on a GPU."])


def main() -> None:
    path = os.path.join(ROOT, "README.md")
    text = open(path).read()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    text = f"{head}{START}\n{render()}\n{END}{tail}"  # rendered before the file is touched
    with open(f"{path}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)
    print(f"updated {path}")


if __name__ == "__main__":
    main()
