"""``build_data``: dataset + tokenizer + packed blocks + loaders in one call, for the launcher."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, NamedTuple

from transformers import PreTrainedTokenizerBase

from .cache import default_cache_dir
from .corpus import DEFAULT_VAL_FRACTION
from .loader import EvalLoader, TrainLoader
from .packing import PackedBlocks, pack_corpus
from .sources import load_text_dataset
from .tokenizer import DEFAULT_VOCAB_SIZE, load_tokenizer

log = logging.getLogger(__name__)


class Data(NamedTuple):
    """What :func:`build_data` returns; unpacks as ``train, val, tokenizer = build_data(...)``."""

    train: TrainLoader
    val: EvalLoader
    tokenizer: PreTrainedTokenizerBase


def _noop() -> None:
    return None


def build_data(
    dataset_spec: str = "default",
    tokenizer_spec: str | None = None,
    seq_len: int = 512,
    cache_dir: str | os.PathLike | None = None,
    rank: int = 0,
    world_size: int = 1,
    micro_batch_size: int = 8,
    seed: int = 1234,
    max_mb: float | None = None,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    text_column: str = "text",
    eval_micro_batch_size: int | None = None,
    eval_max_batches: int | None = None,
    barrier: Callable[[], object] | None = None,
) -> Data:
    """Load ``dataset_spec``, get the tokenizer, tokenize + pack to ``seq_len``, and build the loaders.

    * ``dataset_spec``: ``"default"`` (stdlib corpus), a local file/dir, or a Hub name (see
      :func:`load_text_dataset`); ``max_mb`` caps training text (``None``: 8 MB for ``"default"``,
      no cap otherwise; ``<= 0``: no cap).
    * ``tokenizer_spec``: ``None``/``"bpe"`` trains a byte-level BPE of ``vocab_size`` on the
      training text (cached); otherwise a local tokenizer directory.
    * ``rank``/``world_size``: the *data-parallel* rank and size.  ``barrier`` (e.g.
      ``torch.distributed.barrier``) is called exactly once on every rank: rank 0 builds the
      caches first and then enters the barrier; other ranks wait in it, then load the caches.
      Without a barrier all ranks may build concurrently; the file locks keep that correct.
    * ``cache_dir``: default ``$DSPARSE_DATA_CACHE`` or ``./.cache/dsparse_data``; should be a
      file system shared by the ranks (otherwise every node builds its own copy, still correctly).

    Returns ``Data(train, val, tokenizer)``: an infinite resumable :class:`TrainLoader`, a finite
    :class:`EvalLoader`, and the tokenizer (model vocab size = ``len(tokenizer)``).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (a causal LM predicts token t+1 from t), got {seq_len}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    barrier = barrier or _noop
    if rank != 0:
        barrier()
    try:
        t0 = time.perf_counter()
        corpus = load_text_dataset(
            dataset_spec, val_fraction=val_fraction, max_mb=max_mb, text_column=text_column,
            cache_dir=cache / "hf_datasets",
        )
        t1 = time.perf_counter()
        tokenizer = load_tokenizer(tokenizer_spec, corpus["train"], cache, vocab_size)
        t2 = time.perf_counter()
        packed = pack_corpus(corpus, tokenizer, seq_len, cache)
        t3 = time.perf_counter()
    finally:
        if rank == 0:
            barrier()
    log.info(
        "data ready: %d train / %d validation blocks of %d tokens, vocab %d "
        "(load %.1fs, tokenizer %.1fs, pack %.1fs; %s)",
        len(packed.train), len(packed.validation), seq_len, len(tokenizer), t1 - t0, t2 - t1, t3 - t2, packed.path,
    )
    train = TrainLoader(PackedBlocks(packed.train), micro_batch_size, rank, world_size, seed)
    val = EvalLoader(PackedBlocks(packed.validation), eval_micro_batch_size or micro_batch_size, rank, world_size,
                     eval_max_batches)
    return Data(train, val, tokenizer)
