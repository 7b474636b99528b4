"""Content-keyed cache directories that several processes can fill safely.

A cache entry is a directory ``<root>/<name>`` that appears atomically: it is built in a
temporary sibling directory and renamed into place when complete, under a file lock so that
only one process builds it while the others wait and then reuse it.  Renaming makes the entry
safe even where file locks are unreliable (some network file systems): a reader never sees a
half-written entry, and a process that loses the race simply discards its own copy.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from filelock import FileLock

DEFAULT_CACHE_ENV = "DSPARSE_DATA_CACHE"


def default_cache_dir() -> Path:
    """``$DSPARSE_DATA_CACHE`` if set, else ``./.cache/dsparse_data`` (git-ignored in this repo)."""
    return Path(os.environ.get(DEFAULT_CACHE_ENV) or Path.cwd() / ".cache" / "dsparse_data")


def stable_hash(*parts: object, size: int = 16) -> str:
    """Hex digest of ``parts`` (their ``str``), identical on every machine and Python run."""
    h = hashlib.blake2b(digest_size=size)
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def cached_dir(root: str | os.PathLike, name: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """Return ``(root/name, built)``, calling ``build(tmp_dir)`` first if the entry is missing.

    ``build`` writes the entry's files into the empty directory it is given; on success the
    directory is renamed to ``root/name``.  ``built`` tells whether this call built it.
    """
    root = Path(root)
    final = root / name
    if final.is_dir():
        return final, False
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{name}.lock")):
        if final.is_dir():  # another process finished it while we waited
            return final, False
        tmp = root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            build(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # lost a race despite the lock (no flock on NFS)
                return final, False
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final, True
