"""Tokenizers: a local Hugging Face tokenizer, or a byte-level BPE trained on the corpus and cached.

The trained tokenizer lives in ``<cache_dir>/tokenizers/bpe<vocab>-<key>/`` where ``key`` hashes
the training split's content fingerprint, the vocabulary size and the recipe version, so later
runs and other ranks reuse it.  Concurrency: safe to call from every rank at once -- a file lock
lets one process train while the others wait, and the finished directory appears by an atomic
rename (so even without working locks nobody reads a partial one).  :func:`dsparse.data.build_data`
additionally runs rank 0 first and the other ranks after a barrier, so they do not queue on the lock.

Special tokens of the trained tokenizer: ``<|endoftext|>`` (id 0, eos and bos) and ``<|pad|>``
(id 1).  A loaded tokenizer without an eos token gets its sep/bos token as eos, and pad falls back
to eos; the model's vocabulary size must be ``len(tokenizer)``.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Iterable, Iterator

from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .cache import cached_dir, stable_hash
from .sources import fingerprint

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
DEFAULT_VOCAB_SIZE = 8192
DEFAULT_TRAIN_MB = 256.0
BPE_RECIPE = "bytelevel-bpe-v1"
TRAINED_SPECS = (None, "", "bpe", "default")


def _texts(ds: Dataset, max_bytes: float) -> Iterator[list[str]]:
    """Batches of documents from ``ds`` until about ``max_bytes`` of UTF-8 text was given."""
    seen = 0
    for batch in ds.iter(batch_size=1000):
        yield batch["text"]
        seen += sum(len(t.encode("utf-8")) for t in batch["text"])
        if seen >= max_bytes:
            return


def train_bpe(texts: Iterable[list[str]], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE (no unknown tokens) on batches of texts."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def trained_tokenizer(
    train: Dataset,
    cache_dir: str | os.PathLike,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    train_mb: float = DEFAULT_TRAIN_MB,
) -> PreTrainedTokenizerFast:
    """The byte-level BPE for ``train`` (a ``text`` dataset), trained once and cached by content + vocab size.

    Trains on at most ``train_mb`` MB of the split (its first documents).  The result may have
    fewer than ``vocab_size`` tokens when the text offers too few merges.
    """
    if vocab_size < 258:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes + eos + pad), got {vocab_size}")
    key = stable_hash(BPE_RECIPE, fingerprint(train), vocab_size, train_mb)
    name = f"bpe{vocab_size}-{key[:20]}"

    def build(tmp: Path) -> None:
        t0 = time.perf_counter()
        tok = train_bpe(_texts(train, train_mb * 1e6), vocab_size)
        tok.save_pretrained(tmp)
        log.info("trained byte-level BPE (%d tokens) in %.1fs -> %s", len(tok), time.perf_counter() - t0, name)

    path, _ = cached_dir(Path(cache_dir) / "tokenizers", name, build)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def pretrained_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """A tokenizer from a local directory (or the local Hugging Face cache), never from the network."""
    path = Path(spec).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"tokenizer '{spec}' is a file: pass the directory that holds tokenizer.json/tokenizer_config.json"
        )
    if path.is_dir() and not any(any(path.glob(p)) for p in ("tokenizer*", "*.model", "vocab.*")):
        raise ValueError(
            f"tokenizer directory '{spec}' has no tokenizer files (tokenizer.json, tokenizer_config.json): "
            "point at a saved tokenizer or use 'bpe' to train one"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(path) if path.is_dir() else spec, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - report any loader failure on one line
        where = "directory" if path.is_dir() else "name (not a local directory, not in the local HF cache)"
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise ValueError(f"tokenizer {where} '{spec}' could not be loaded ({reason}): "
                         "pass a saved tokenizer directory or 'bpe' to train one") from None
    return with_special_tokens(tok)


def with_special_tokens(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Make sure ``tok`` has eos (sep/bos, else a new ``<|endoftext|>``) and pad (defaults to eos)."""
    if tok.eos_token is None:
        if tok.sep_token is not None or tok.bos_token is not None:
            tok.eos_token = tok.sep_token if tok.sep_token is not None else tok.bos_token
        else:
            tok.add_special_tokens({"eos_token": EOS_TOKEN})
            log.warning("tokenizer had no eos/sep/bos token; added %s (vocabulary is now %d)", EOS_TOKEN, len(tok))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer(
    spec: str | None,
    train: Dataset | None = None,
    cache_dir: str | os.PathLike | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    train_mb: float = DEFAULT_TRAIN_MB,
) -> PreTrainedTokenizerBase:
    """``spec`` None/``"bpe"``/``"default"``: train (or reuse) a BPE on ``train``; else load a local tokenizer."""
    if spec in TRAINED_SPECS:
        if train is None or cache_dir is None:
            raise ValueError("training a BPE tokenizer needs the training split and a cache_dir")
        return trained_tokenizer(train, cache_dir, vocab_size, train_mb)
    return pretrained_tokenizer(spec)


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """A hash of everything that decides token ids: the serialized tokenizer (or vocab) and eos."""
    if getattr(tok, "backend_tokenizer", None) is not None:
        body = tok.backend_tokenizer.to_str()
    else:
        body = repr(sorted(tok.get_vocab().items()))
    return stable_hash("tokenizer-v1", type(tok).__name__, body, tok.eos_token_id, len(tok))
