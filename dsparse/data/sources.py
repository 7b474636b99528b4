"""``load_text_dataset``: any text source as ``train``/``validation`` splits with one ``text`` column.

Sources, in the order they are tried:

* ``"default"``: the embedded stdlib corpus (:mod:`dsparse.data.corpus`);
* an existing local file or directory of ``.txt``/``.jsonl``/``.json``/``.parquet`` files
  (optionally ``.gz``/``.bz2``/``.xz``/``.zst`` compressed), read with datasets' ``text``,
  ``json`` and ``parquet`` builders with the Hub switched off;
* otherwise a Hub dataset name (``owner/name``, optionally ``owner/name:config``) through
  ``datasets.load_dataset``.

Every split's datasets fingerprint is replaced by a hash of its text, so caches downstream key on
content, and a source without a validation split is split deterministically by the same hash.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import datasets
import numpy as np
from datasets import Dataset, DatasetDict

from .cache import stable_hash
from .corpus import DEFAULT_MAX_MB, DEFAULT_VAL_FRACTION, default_corpus

DEFAULT_MAX_VAL_MB = 16.0
TXT_EXTS = {".txt", ".text"}
JSON_EXTS = {".jsonl", ".json", ".ndjson"}
PARQUET_EXTS = {".parquet"}
COMPRESSION_EXTS = {".gz", ".bz2", ".xz", ".zst"}
VAL_SPLIT_NAMES = ("validation", "valid", "val", "dev", "eval", "test")
_VAL_PATH = re.compile(r"(?:^|[\W_])(?:validation|valid|val|dev|eval|test)(?:[\W_]|$)", re.IGNORECASE)


def fingerprint(ds: Dataset) -> str:
    """The datasets fingerprint of ``ds`` (content-derived for datasets made by this package)."""
    return ds._fingerprint


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Switch datasets/huggingface_hub to offline mode for the duration (local files only)."""
    import huggingface_hub.constants as hub_constants

    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE"))
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved[0], saved[1]
        if saved[2] is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved[2]


def _kind(path: Path) -> str | None:
    """The datasets builder for a file name (``text``/``json``/``parquet``), or ``None``."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_EXTS:
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    if ext in TXT_EXTS:
        return "text"
    if ext in JSON_EXTS:
        return "json"
    if ext in PARQUET_EXTS:
        return "parquet"
    return None


def _looks_like_path(spec: str) -> bool:
    """Whether a missing ``spec`` was meant as a local path rather than a Hub name."""
    head = spec.split(":", 1)[0]
    return (
        spec.startswith(("/", "./", "../", "~", "."))
        or head.count("/") > 1
        or _kind(Path(head)) is not None
    )


def _local_files(path: Path) -> tuple[str, dict[str, list[str]]]:
    """(builder, {split: files}) for a local file or directory; names like ``val``/``test`` -> validation."""
    if path.is_file():
        kind = _kind(path)
        if kind is None:
            raise ValueError(
                f"dataset file '{path}' has an unsupported extension: use .txt, .jsonl, .json or .parquet"
            )
        return kind, {"train": [str(path)]}
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and _kind(p) is not None and not any(s.startswith(".") for s in p.relative_to(path).parts)
    )
    if not files:
        raise ValueError(
            f"dataset directory '{path}' has no .txt/.jsonl/.json/.parquet files: add some or point at a file"
        )
    kinds = {_kind(p) for p in files}
    if len(kinds) > 1:
        found = ", ".join(sorted({p.suffix for p in files}))
        raise ValueError(f"dataset directory '{path}' mixes file types ({found}): keep one format per directory")
    val = [str(p) for p in files if _VAL_PATH.search(p.relative_to(path).as_posix())]
    train = [str(p) for p in files if str(p) not in set(val)]
    return kinds.pop(), ({"train": train, "validation": val} if train and val else {"train": [str(p) for p in files]})


def _load_local(path: Path, text_column: str, txt_sample_by: str, cache_dir: str | None) -> tuple[DatasetDict, str]:
    """Read local files with datasets' builders, Hub off; returns the splits and their text column."""
    kind, data_files = _local_files(path)
    kwargs = {"sample_by": txt_sample_by} if kind == "text" else {}
    with hub_offline():
        dsd = datasets.load_dataset(kind, data_files=data_files, cache_dir=cache_dir, **kwargs)
    if kind == "text":
        return dsd, "text"
    _check_column(dsd, text_column, f"dataset '{path}'")
    return dsd, text_column


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub endpoint cannot be reached (a quick TCP connect), or ``None`` if it can or a proxy is set.

    Saves huggingface_hub's ~30 s of retries on machines without network.
    """
    import huggingface_hub.constants as hub_constants

    if datasets.config.HF_HUB_OFFLINE:
        return None  # load_dataset then fails fast (or uses the local cache) on its own
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return None
    url = urlparse(hub_constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as e:
        return f"cannot connect to {hub_constants.ENDPOINT} ({e})"
    return None


def _load_hub(spec: str, cache_dir: str | None) -> DatasetDict:
    """``datasets.load_dataset(name, config)``; offline from the local cache when the Hub is unreachable."""
    name, _, config = spec.partition(":")
    unreachable = _hub_unreachable()
    try:
        with hub_offline() if unreachable else contextlib.nullcontext():
            out = datasets.load_dataset(name, config or None, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - any failure means "not usable"; report it on one line
        reason = unreachable + ", not in the local cache" if unreachable else f"{type(e).__name__}: {e}"
        reason = " ".join(reason.split())[:300]
        raise ValueError(f"dataset '{spec}' is neither a local path nor a reachable hub dataset: {reason}") from None
    if isinstance(out, Dataset):
        out = DatasetDict({"train": out})
    return out


def _check_column(dsd: DatasetDict, column: str, what: str) -> None:
    for split, ds in dsd.items():
        if column not in ds.column_names:
            raise ValueError(
                f"{what} has no '{column}' column in split '{split}' (columns: {', '.join(ds.column_names)}): "
                f"add a '{column}' field or pass text_column=<one of them>"
            )


def _scan(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Per-document (content hash as uint64, UTF-8 byte length); empty/blank documents get length 0."""
    hashes, lengths = [], []
    for batch in ds.iter(batch_size=4096):
        for text in batch["text"]:
            data = text.encode("utf-8") if isinstance(text, str) and text.strip() else b""
            hashes.append(int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big"))
            lengths.append(len(data))
    return np.array(hashes, dtype=np.uint64), np.array(lengths, dtype=np.int64)


def _cap(idx: np.ndarray, lengths: np.ndarray, max_mb: float | None) -> np.ndarray:
    """The prefix of ``idx`` whose text fits in ``max_mb`` (at least one document)."""
    if max_mb is None or max_mb <= 0 or len(idx) == 0:
        return idx
    n = int(np.searchsorted(np.cumsum(lengths[idx]), max_mb * 1e6, side="right"))
    return idx[: max(n, 1)]


def _finalize(
    dsd: DatasetDict, spec: str, text_column: str, val_fraction: float, max_mb: float | None, max_val_mb: float | None
) -> DatasetDict:
    """Pick train/validation, keep only non-empty ``text``, split/cap deterministically, fingerprint by content."""
    _check_column(dsd, text_column, f"dataset '{spec}'")
    train_name = "train" if "train" in dsd else next((s for s in dsd if s not in VAL_SPLIT_NAMES), None)
    if train_name is None:
        train_name = next(iter(dsd))
    val_name = next((s for s in VAL_SPLIT_NAMES if s in dsd and s != train_name), None)
    splits = {"train": dsd[train_name]} | ({"validation": dsd[val_name]} if val_name else {})
    for name, ds in splits.items():
        ds = ds.select_columns([text_column])
        if text_column != "text":
            ds = ds.rename_column(text_column, "text")
        if ds.features["text"] != datasets.Value("string") and ds.features["text"] != datasets.Value("large_string"):
            raise ValueError(
                f"dataset '{spec}': column '{text_column}' holds {ds.features['text']}, not text: "
                "pass text_column=<a string column>"
            )
        splits[name] = ds
    scans = {name: _scan(ds) for name, ds in splits.items()}
    train_hash, train_len = scans["train"]
    train_idx = np.flatnonzero(train_len > 0)
    if len(train_idx) == 0:
        raise ValueError(
            f"dataset '{spec}' has no non-empty text in its '{train_name}' split: check the files or text_column"
        )
    if "validation" in splits and (scans["validation"][1] > 0).any():
        val_hash, val_len = scans["validation"]
        val_idx = np.flatnonzero(val_len > 0)
    else:
        if len(train_idx) < 2:
            raise ValueError(
                f"dataset '{spec}' has a single document, too few to hold out validation text: "
                "add documents, a validation file, or load .txt by paragraph"
            )
        units = train_hash[train_idx] / np.float64(2**64)
        is_val = units < val_fraction
        if not is_val.any():
            is_val[np.argmin(units)] = True
        val_hash, val_len, val_idx = train_hash, train_len, train_idx[is_val]
        train_idx = train_idx[~is_val]
        splits["validation"] = splits["train"]
    train_idx = _cap(train_idx, train_len, max_mb)
    val_idx = _cap(val_idx, val_len, max_val_mb)
    out = {}
    for name, idx, hashes in (("train", train_idx, train_hash), ("validation", val_idx, val_hash)):
        fp = stable_hash("text-dataset-v1", name, hashes[idx].tobytes(), len(idx))
        out[name] = splits[name].select(idx, new_fingerprint=fp)
    return DatasetDict(out)


def load_text_dataset(
    spec: str = "default",
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    max_mb: float | None = None,
    max_val_mb: float | None = DEFAULT_MAX_VAL_MB,
    text_column: str = "text",
    txt_sample_by: str = "paragraph",
    cache_dir: str | os.PathLike | None = None,
) -> DatasetDict:
    """Load ``spec`` as a ``DatasetDict`` with ``train`` and ``validation`` splits and one ``text`` column.

    ``max_mb`` caps the training text in MB of UTF-8 (first documents in source order; for
    ``"default"`` the corpus' own hash order): ``None`` means 8 MB for ``"default"`` and no cap
    otherwise, ``<= 0`` means no cap.  ``max_val_mb`` caps validation text the same way.
    ``txt_sample_by`` is how ``.txt`` files become documents (``line``/``paragraph``/``document``).
    Local files whose path (below the given directory) contains ``validation``/``valid``/``val``/
    ``dev``/``eval``/``test`` form the validation split; otherwise about ``val_fraction`` of the
    documents are held out by content hash.  ``cache_dir`` is passed to ``datasets.load_dataset``.
    Errors are one-line ``ValueError``s.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if txt_sample_by not in ("line", "paragraph", "document"):
        raise ValueError(f"txt_sample_by must be 'line', 'paragraph' or 'document', got {txt_sample_by!r}")
    cache = None if cache_dir is None else str(cache_dir)
    if spec == "default":
        return default_corpus(DEFAULT_MAX_MB if max_mb is None else max_mb, val_fraction)
    path = Path(spec).expanduser()
    if path.exists():
        dsd, column = _load_local(path, text_column, txt_sample_by, cache)
        return _finalize(dsd, str(path), column, val_fraction, max_mb, max_val_mb)
    if _looks_like_path(spec):
        raise ValueError(
            f"dataset path '{spec}' does not exist: "
            "pass an existing file or directory, 'default', or a hub dataset name"
        )
    return _finalize(_load_hub(spec, cache), spec, text_column, val_fraction, max_mb, max_val_mb)
