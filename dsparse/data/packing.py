"""Tokenize once, pack into fixed-length blocks, cache as memory-mapped Arrow files.

Each split's documents are tokenized without special tokens, each followed by eos, concatenated
in order and cut into blocks of ``seq_len`` tokens; only the final partial block is dropped.
The result is ``<cache_dir>/packed/<key>/{train,validation}.arrow`` (Arrow IPC streams that
``datasets.Dataset.from_file`` memory-maps) plus ``meta.json``, where ``key`` hashes the split
fingerprints, the tokenizer fingerprint and ``seq_len``.  The same lock/atomic-rename scheme as the
tokenizer makes concurrent builders safe.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .cache import cached_dir, stable_hash
from .sources import fingerprint
from .tokenizer import tokenizer_fingerprint

log = logging.getLogger(__name__)

PACK_VERSION = "pack-v1"
WRITE_BLOCKS = 1024  # blocks per Arrow record batch


def _encode(tok: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens.

    A plain ``PreTrainedTokenizerFast`` (like the trained BPE) goes straight to its Rust backend
    (same ids, less overhead); model-specific classes go through ``__call__`` for their own pre-processing.
    """
    if type(tok) is PreTrainedTokenizerFast:
        backend = tok.backend_tokenizer
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]
    return tok(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def _write_blocks(ds: Dataset, tok: PreTrainedTokenizerBase, seq_len: int, path: Path, batch_docs: int) -> dict:
    """Tokenize ``ds`` and stream its ``seq_len`` blocks to an Arrow file; returns token counts."""
    eos = tok.eos_token_id
    schema = pa.schema([pa.field("input_ids", pa.list_(pa.int32(), seq_len))])
    carry = np.empty(0, dtype=np.int32)
    tokens = blocks = docs = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in ds.iter(batch_size=batch_docs):
            ids = _encode(tok, batch["text"])
            flat = np.fromiter(
                itertools.chain.from_iterable(itertools.chain(x, (eos,)) for x in ids),
                dtype=np.int32,
                count=sum(len(x) + 1 for x in ids),
            )
            docs += len(ids)
            tokens += len(flat)
            carry = np.concatenate([carry, flat])
            n = (len(carry) // (seq_len * WRITE_BLOCKS)) * WRITE_BLOCKS
            if n:
                _emit(writer, schema, carry[: n * seq_len], seq_len)
                blocks += n
                carry = carry[n * seq_len :]
        n = len(carry) // seq_len
        if n:
            _emit(writer, schema, carry[: n * seq_len], seq_len)
            blocks += n
    return {"documents": docs, "tokens": tokens, "blocks": blocks, "dropped_tokens": tokens - blocks * seq_len}


def _emit(writer: pa.ipc.RecordBatchStreamWriter, schema: pa.Schema, flat: np.ndarray, seq_len: int) -> None:
    for start in range(0, len(flat), WRITE_BLOCKS * seq_len):
        arr = pa.FixedSizeListArray.from_arrays(pa.array(flat[start : start + WRITE_BLOCKS * seq_len]), seq_len)
        writer.write_batch(pa.record_batch([arr], schema=schema))


@dataclass(frozen=True)
class Packed:
    """Packed splits (memory-mapped datasets), their token counts (``meta``) and cache directory."""

    train: Dataset
    validation: Dataset
    meta: dict
    path: Path


def pack_key(corpus: DatasetDict, tok: PreTrainedTokenizerBase, seq_len: int) -> str:
    """The cache key of the packed blocks: content of both splits, tokenizer and ``seq_len``."""
    return stable_hash(PACK_VERSION, fingerprint(corpus["train"]), fingerprint(corpus["validation"]),
                       tokenizer_fingerprint(tok), seq_len)


def pack_corpus(
    corpus: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    cache_dir: str | os.PathLike,
    batch_docs: int = 1024,
) -> Packed:
    """Packed ``train``/``validation`` datasets with one ``input_ids`` column (int32 lists of ``seq_len``).

    Built once per (corpus, tokenizer, seq_len) under ``cache_dir/packed`` and memory-mapped
    afterwards.  Raises a one-line ``ValueError`` when a split has fewer than ``seq_len`` tokens.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (a causal LM predicts token t+1 from t), got {seq_len}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token: use dsparse.data.tokenizer.with_special_tokens(tok)")
    key = pack_key(corpus, tokenizer, seq_len)

    def build(tmp: Path) -> None:
        t0 = time.perf_counter()
        meta = {"seq_len": seq_len, "eos_token_id": tokenizer.eos_token_id, "vocab_size": len(tokenizer)}
        for split in ("train", "validation"):
            meta[split] = _write_blocks(corpus[split], tokenizer, seq_len, tmp / f"{split}.arrow", batch_docs)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        log.info("tokenized and packed in %.1fs: %s", time.perf_counter() - t0, meta)

    path, _ = cached_dir(Path(cache_dir) / "packed", f"L{seq_len}-{key[:20]}", build)
    meta = json.loads((path / "meta.json").read_text())
    for split in ("train", "validation"):
        if meta[split]["blocks"] == 0:
            raise ValueError(
                f"the {split} text has {meta[split]['tokens']} tokens, fewer than seq_len={seq_len}: "
                f"use a smaller seq_len or more {split} text (max_mb / val_fraction)"
            )
    splits = {s: Dataset.from_file(str(path / f"{s}.arrow"), split=s) for s in ("train", "validation")}
    return Packed(splits["train"], splits["validation"], meta, path)


class PackedBlocks:
    """Random access to a packed split as a ``(num_blocks, seq_len)`` int32 array, zero-copy.

    Accepts a packed ``datasets.Dataset`` (one ``input_ids`` fixed-size list column, as made by
    :func:`pack_corpus`) or a 2-D numpy array; ``blocks[idx]`` gathers rows for an index array.
    """

    def __init__(self, data: Dataset | np.ndarray) -> None:
        if isinstance(data, np.ndarray):
            if data.ndim != 2:
                raise ValueError(f"blocks must be a 2-D (num_blocks, seq_len) array, got shape {data.shape}")
            self._chunks = [data]
        else:
            if data._indices is not None:
                data = data.flatten_indices()
            col = data.data.column("input_ids")
            seq_len = col.type.list_size
            self._chunks = [
                c.flatten().to_numpy(zero_copy_only=True).reshape(-1, seq_len) for c in col.chunks if len(c)
            ]
        self._starts = np.cumsum([0] + [len(c) for c in self._chunks])
        self.seq_len = int(self._chunks[0].shape[1]) if self._chunks else 0

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        if len(self._chunks) == 1:
            return self._chunks[0][idx]
        which = np.searchsorted(self._starts, idx, side="right") - 1
        out = np.empty((len(idx), self.seq_len), dtype=self._chunks[0].dtype)
        for c in np.unique(which):
            sel = which == c
            out[sel] = self._chunks[c][idx[sel] - self._starts[c]]
        return out
