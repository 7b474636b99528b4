"""Data-parallel, resumable batch iterators over packed blocks.

Training order is one infinite *global sample stream*: the concatenation of per-epoch
permutations ``perm(seed, 0) ++ perm(seed, 1) ++ ...`` of the ``N`` training blocks.  Every call
to ``next()`` on every rank consumes the next ``world_size * micro_batch_size`` stream positions;
rank ``r`` takes the ``r``-th contiguous ``micro_batch_size`` of them.  The only state is the
number of samples consumed globally (the epoch is ``consumed // N``), so:

* a resumed loader continues at exactly the next batch (no sample repeated or skipped);
* the world size (or micro batch) may change between save and resume: the global stream is the
  same, the new ranks just cut it differently from the saved position on;
* no sample is dropped at epoch ends: a batch that crosses an epoch boundary takes the last
  blocks of one permutation and the first of the next.

Permutations use ``numpy.random.default_rng([seed, epoch])`` (PCG64), stable across machines.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from .packing import PackedBlocks

STATE_VERSION = 1


def _batch(blocks: PackedBlocks, idx: np.ndarray) -> dict[str, torch.Tensor]:
    ids = torch.from_numpy(blocks[idx].astype(np.int64))
    return {"input_ids": ids, "labels": ids.clone()}


def _check_sizes(micro_batch_size: int, rank: int, world_size: int) -> None:
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


class TrainLoader:
    """Infinite iterator of ``{"input_ids", "labels"}`` int64 tensors of shape ``(micro_batch_size, seq_len)``.

    ``state_dict()`` describes the position after the batches returned so far (identical on all
    ranks); save it with the checkpoint and pass it to ``load_state_dict()`` on resume.
    """

    def __init__(
        self,
        blocks: PackedBlocks,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        consumed_samples: int = 0,
    ) -> None:
        _check_sizes(micro_batch_size, rank, world_size)
        if len(blocks) == 0:
            raise ValueError("no training blocks: use more text or a smaller seq_len")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.blocks, self.micro_batch_size, self.rank, self.world_size = blocks, micro_batch_size, rank, world_size
        self.seed, self.consumed_samples = int(seed), int(consumed_samples)
        self._perms: dict[int, np.ndarray] = {}

    @property
    def num_samples(self) -> int:
        """Training blocks per epoch."""
        return len(self.blocks)

    @property
    def global_batch_size(self) -> int:
        """Samples consumed (over all ranks) per ``next()``."""
        return self.micro_batch_size * self.world_size

    @property
    def epoch(self) -> int:
        """The epoch of the next sample to be read."""
        return self.consumed_samples // self.num_samples

    def permutation(self, epoch: int) -> np.ndarray:
        """The block order of ``epoch`` (the same on every rank and machine for a given seed)."""
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return self._perms[epoch]

    def stream_indices(self, start: int, count: int) -> np.ndarray:
        """Block indices at global stream positions ``start .. start+count-1``."""
        pos = np.arange(start, start + count, dtype=np.int64)
        epochs, offsets = np.divmod(pos, self.num_samples)
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.permutation(int(e))[offsets[sel]]
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start = self.consumed_samples + self.rank * self.micro_batch_size
        idx = self.stream_indices(start, self.micro_batch_size)
        self.consumed_samples += self.global_batch_size
        return _batch(self.blocks, idx)

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state: ``consumed_samples`` (global), ``epoch``, ``seed``, ``num_samples``."""
        return {
            "version": STATE_VERSION,
            "consumed_samples": self.consumed_samples,
            "epoch": self.epoch,
            "seed": self.seed,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (saved with any world size); refuses a changed dataset or seed."""
        if state.get("num_samples") != self.num_samples:
            raise ValueError(
                f"the data state was saved for {state.get('num_samples')} training blocks but there are now "
                f"{self.num_samples}: resume with the same dataset, tokenizer, seq_len and max_mb, "
                "or drop the data state"
            )
        if state.get("seed") != self.seed:
            raise ValueError(
                f"the data state was saved with seed {state.get('seed')}, not {self.seed}: resume with the same seed"
            )
        self.consumed_samples = int(state["consumed_samples"])


class EvalLoader:
    """Finite, re-iterable validation batches in a fixed order, sharded over ranks.

    Every rank yields the same number of batches, ``ceil(M / (world_size * micro_batch_size))``
    (capped by ``max_batches``), as ZeRO-3 needs all ranks in every forward; the last global batch
    wraps around to the first blocks, so fewer than one global batch of blocks is counted twice.
    """

    def __init__(
        self,
        blocks: PackedBlocks,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        max_batches: int | None = None,
    ) -> None:
        _check_sizes(micro_batch_size, rank, world_size)
        if len(blocks) == 0:
            raise ValueError("no validation blocks: use more validation text or a smaller seq_len")
        self.blocks, self.micro_batch_size, self.rank, self.world_size = blocks, micro_batch_size, rank, world_size
        self.max_batches = max_batches

    def __len__(self) -> int:
        global_batch = self.micro_batch_size * self.world_size
        n = -(-len(self.blocks) // global_batch)
        return n if self.max_batches is None else min(n, self.max_batches)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        global_batch = self.micro_batch_size * self.world_size
        for b in range(len(self)):
            start = b * global_batch + self.rank * self.micro_batch_size
            idx = np.arange(start, start + self.micro_batch_size) % len(self.blocks)
            yield _batch(self.blocks, idx)
