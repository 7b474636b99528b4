"""What a pretraining run leaves behind: ``metrics.jsonl``, TensorBoard scalars and ``loss.png``."""
from __future__ import annotations

import json
import os
from typing import Any


class RunLog:
    """Appends metric rows (rank 0 only) and mirrors them to DeepSpeed's monitor (TensorBoard)."""

    def __init__(self, output_dir: str, enabled: bool, monitor: Any = None) -> None:
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.plot_path = os.path.join(output_dir, "loss.png")
        self.enabled = enabled
        self.monitor = monitor if monitor is not None and getattr(monitor, "enabled", False) else None

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.monitor is not None:
            step = row["step"]
            self.monitor.write_events([(f"dsparse/{k}", float(v), step) for k, v in row.items()
                                       if k != "step" and isinstance(v, (int, float))])

    def rows(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def plot(self) -> None:
        """Train and validation loss against step, with phase changes marked."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows()
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train loss", lw=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss")
        last = None
        for r in rows:
            if "phase" in r and r["phase"] != last:
                if last is not None:
                    ax.axvline(r["step"], color="grey", ls="--", lw=0.8)
                    ax.text(r["step"], ax.get_ylim()[1], f" {r['phase']}", va="top", fontsize=8)
                last = r["phase"]
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        tmp = self.plot_path + ".tmp.png"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, self.plot_path)
