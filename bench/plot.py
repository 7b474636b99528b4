"""PNG charts of the benchmark results: layer speedups per shape, training/inference ratios, and where
a training step's GPU time goes (the ``--profile`` runs of bench/step.py).

    python -m bench.plot        # writes bench/results/<name>.png next to each JSON it can draw
"""
from __future__ import annotations

import glob
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "results")


def plot_layer(path: str) -> str | None:
    data = json.load(open(path))
    rows = [r for r in data["rows"] if "speedup_sparse_tuned" in r]
    if not rows:
        return None
    labels = [f"{r['in']}x{r['out']}\nT={r['tokens']} {r['dtype']}" for r in rows]
    parts = ("fwd", "dx", "dw", "step")
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.7), 4.5))
    width = 0.8 / len(parts)
    for i, part in enumerate(parts):
        ax.bar([x + i * width for x in range(len(rows))], [r["speedup_sparse_tuned"][part] for r in rows], width,
               label=part)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], labels, fontsize=6, rotation=90)
    ax.set_ylabel("dense time / sparse time")
    ax.set_title(f"SparseLinear vs nn.Linear, {data['environment'].get('gpu')}")
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    out = path.removesuffix(".json") + ".png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_ratios(path: str) -> str | None:
    data = json.load(open(path))
    ratios = data.get("vs_dense")
    if not ratios:
        return None
    names = list(ratios)
    keys = sorted({k for r in ratios.values() for k in r})
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        ax.bar([x + i * width for x in range(len(names))], [ratios[n].get(key, 0) for n in names], width, label=key)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names)
    ax.set_ylabel("ratio vs dense")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = path.removesuffix(".json") + ".png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_profile(path: str) -> str | None:
    """One stacked bar per run: GPU milliseconds per step by kernel category, and the step's wall time."""
    from bench.common import category_order

    runs = json.load(open(path))["runs"]
    order = category_order(list(runs.values()))
    names = list(runs)
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(names) + 2))
    left = [0.0] * len(names)
    colors = plt.get_cmap("tab20").colors
    for i, category in enumerate(order):
        widths = [runs[n]["gpu_profile"]["by_category_ms"].get(category, 0.0) for n in names]
        ax.barh(names, widths, left=left, color=colors[i % len(colors)], label=category)
        left = [a + b for a, b in zip(left, widths)]
    ax.scatter([runs[n]["step_s_median"] * 1e3 for n in names], names, marker="|", s=300, color="black",
               label="step wall time", zorder=3)
    ax.invert_yaxis()
    ax.set_xlabel("ms per step")
    first = next(iter(runs.values()))
    ax.set_title(f"{first['model']}, {first['micro_batch_size']}x{first['seq_len']} tokens: GPU time by kernel category")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    out = path.removesuffix(".json") + ".png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    for path in sorted(glob.glob(os.path.join(RESULTS, "*.json"))):
        name = os.path.basename(path)
        if name.startswith("layer_"):
            out = plot_layer(path)
        elif name.endswith("_profile.json"):
            out = plot_profile(path)
        else:
            out = plot_ratios(path)
        if out:
            print(f"wrote {out}")


if __name__ == "__main__":
    main()
