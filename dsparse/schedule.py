"""The SLoPe training schedule: dense warm-up (optional) -> sparse -> sparse + lazy adapters."""
from __future__ import annotations

from dataclasses import dataclass

from .config import SparsityConfig


@dataclass(frozen=True)
class Schedule:
    """Which phase each optimizer step belongs to; steps count applied optimizer steps from 0."""

    sparse: bool
    dense_warmup_steps: int = 0
    adapter_start_step: int | None = None

    @classmethod
    def from_config(cls, config: SparsityConfig | None) -> "Schedule":
        if config is None or not config.enabled:
            return cls(sparse=False)
        return cls(sparse=True, dense_warmup_steps=config.dense_warmup_steps,
                   adapter_start_step=config.adapter_start_step())

    def phase(self, step: int) -> str:
        """The phase of the optimizer step that follows ``step`` applied steps."""
        if not self.sparse or step < self.dense_warmup_steps:
            return "dense"
        if self.adapter_start_step is not None and step >= max(self.adapter_start_step, self.dense_warmup_steps):
            return "adapters"
        return "sparse"
