"""The embedded default corpus: the running interpreter's standard-library Python sources.

Every machine with Python has this real text without any download, and it is identical on
machines with the same Python build (its fingerprint covers the content, so a different build
simply gets its own cache entries).  One document per ``.py`` file.  Skipped: site-packages,
test suites and their data, generated tables (``encodings``, ``pydoc_data``) and per-build files
(``_sysconfigdata*``, ``config-*``).

Determinism: the validation split is chosen by a stable hash of each file's path relative to the
stdlib root (about ``val_fraction`` of the files), and the size cap fills the training split with
files taken in a second stable hash order, skipping any that would overflow the cap.
"""
from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

from datasets import Dataset, DatasetDict

from .cache import stable_hash

DEFAULT_MAX_MB = 8.0
DEFAULT_VAL_FRACTION = 0.02
SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "encodings", "pydoc_data"}
)


def stdlib_root() -> Path:
    """The directory holding the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """Sorted POSIX paths (relative to ``root``) of the stdlib ``.py`` files the corpus uses."""
    root = root or stdlib_root()
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(p in SKIP_DIRS or p.startswith("config-") for p in rel.parts[:-1]):
            continue
        if rel.name.startswith("_sysconfigdata") or not path.is_file():
            continue
        out.append(rel.as_posix())
    return sorted(out)


def _unit(salt: str, key: str) -> float:
    """A stable pseudo-random number in [0, 1) for ``key``."""
    digest = hashlib.blake2b(f"{salt}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_files(files: list[str], val_fraction: float = DEFAULT_VAL_FRACTION) -> tuple[list[str], list[str]]:
    """Split relative paths into (train, validation) by a stable hash; validation is never empty."""
    val = [f for f in files if _unit("dsparse-val", f) < val_fraction]
    if not val and len(files) > 1:
        val = [min(files, key=lambda f: _unit("dsparse-val", f))]
    held = set(val)
    return [f for f in files if f not in held], val


def cap_files(files: list[str], sizes: dict[str, int], max_bytes: int | None) -> list[str]:
    """Deterministically pick files whose sizes sum to at most ``max_bytes`` (at least one file).

    Files are visited in a stable hash order (a spread over the whole library rather than the
    alphabetically first packages) and skipped when they would overflow the cap.  The result is
    returned sorted by path.
    """
    if max_bytes is None:
        return list(files)
    chosen, total = [], 0
    for f in sorted(files, key=lambda f: (_unit("dsparse-cap", f), f)):
        if total + sizes[f] <= max_bytes or not chosen:
            chosen.append(f)
            total += sizes[f]
    return sorted(chosen)


def default_corpus(
    max_mb: float | None = DEFAULT_MAX_MB, val_fraction: float = DEFAULT_VAL_FRACTION
) -> DatasetDict:
    """The stdlib corpus as a ``DatasetDict`` with ``train``/``validation`` splits and a ``text`` column.

    ``max_mb`` caps the training text (MB = 10**6 bytes of UTF-8); ``None`` or ``<= 0`` keeps
    everything (about 12 MB on CPython 3.11).  The validation split is not capped.  Each split's
    datasets fingerprint is a hash of its content, so downstream caches key on the actual text.
    """
    root = stdlib_root()
    files = stdlib_files(root)
    if not files:
        raise ValueError(f"no Python sources found under the stdlib directory {root}: pass --dataset with a local path")
    sizes = {f: (root / f).stat().st_size for f in files}
    train, val = split_files(files, val_fraction)
    cap = None if max_mb is None or max_mb <= 0 else int(max_mb * 1e6)
    splits = {"train": cap_files(train, sizes, cap), "validation": val}
    out = {}
    for name, rels in splits.items():
        texts = [(root / f).read_text(encoding="utf-8", errors="replace") for f in rels]
        keep = [(r, t) for r, t in zip(rels, texts) if t.strip()]
        fp = stable_hash("stdlib-corpus-v1", name, *(x for pair in keep for x in pair))
        ds = Dataset.from_dict({"text": [t for _, t in keep]}, split=name)
        out[name] = ds.select(range(len(ds)), new_fingerprint=fp)
    return DatasetDict(out)
