"""The compiled grammars' disk cache: files under one root folder, bounded in bytes, least recently
used evicted first.

Any client of a server can send new schemas, and one compiled grammar can take tens of MB, so the
folder has a size cap (``$AGENTRT_GRAMMAR_CACHE_MB``, default 256). A read marks its entry as used
(mtime); a write that takes the folder over the cap deletes the least recently used entries until it
fits again. Finding that out means listing the folder (thousands of files in a long-lived cache), so a
writer lists it only when what it knows (the size at its last listing plus its own writes since) is past
half the cap, or when that listing is more than ``RESCAN_S`` old. Several processes may share the folder: writes go to a unique temporary name and are
renamed into place (atomic), and an entry another process deleted or is replacing is just a miss.
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

DEFAULT_MAX_BYTES = 256 << 20
MAX_BYTES_ENV = "AGENTRT_GRAMMAR_CACHE_MB"
RESCAN_S = 10.0  # other processes may write to the folder too: what a writer knows of its size ages


def cache_base() -> str:
    """``$AGENTRT_CACHE_DIR``, else ``$XDG_CACHE_HOME`` or ``~/.cache`` + ``agentrt``."""
    return os.environ.get("AGENTRT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "agentrt")


def default_cache_dir() -> str:
    """Where compiled grammars are kept on disk: ``cache_base()/grammar``."""
    return os.path.join(cache_base(), "grammar")


def max_bytes_from_env() -> int:
    """``$AGENTRT_GRAMMAR_CACHE_MB`` in bytes, else the default (256 MB); 0 turns the disk cache off."""
    raw = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_BYTES
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"${MAX_BYTES_ENV}={raw!r}: give the cache's size cap in MB (0 = no disk cache)") from None
    if mb < 0:
        raise ValueError(f"${MAX_BYTES_ENV}={raw!r}: the size cap cannot be negative")
    return int(mb * (1 << 20))


class DiskCache:
    """Entries ``<root>/<space>/<key>.pkl`` (the compiler's pickles); the cap counts every space under ``root``."""

    def __init__(self, root: str | os.PathLike[str], space: str, max_bytes: int | None = None):
        self.root = Path(root)
        self.folder = self.root / space
        self.max_bytes = max_bytes_from_env() if max_bytes is None else max_bytes
        self._lock = threading.Lock()
        self._known_bytes: int | None = None  # under root at the last listing, plus this cache's writes since
        self._listed_at = 0.0

    def load(self, key: str) -> bytes | None:
        """The bytes stored under ``key``, or None (absent, unreadable, or the cache is off)."""
        path = self.folder / f"{key}.pkl"
        if self.max_bytes <= 0:
            return None
        try:
            data = path.read_bytes()
            os.utime(path)  # recently used: evicted last
            return data
        except OSError:  # absent, or deleted meanwhile by another process's eviction
            return None

    def save(self, key: str, data: bytes) -> None:
        """Store ``data`` (best effort: a read-only or full disk only costs recompiles), then evict."""
        if self.max_bytes <= 0 or len(data) > self.max_bytes:  # too big: it would evict all else and not fit
            return
        path = self.folder / f"{key}.pkl"
        tmp = self.folder / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            return
        with self._lock:
            known = self._known_bytes = None if self._known_bytes is None else self._known_bytes + len(data)
        if known is None or known > self.max_bytes // 2 or time.monotonic() - self._listed_at > RESCAN_S:
            self.evict()

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last used, bytes, path) of every entry under the root."""
        out = []
        for space in _listing(self.root):
            if not space.is_dir():
                continue
            for entry in _listing(space.path):
                if entry.name.endswith(".pkl"):
                    try:
                        st = entry.stat()
                    except FileNotFoundError:  # evicted meanwhile
                        continue
                    out.append((st.st_mtime, st.st_size, Path(entry.path)))
        return out

    def size_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def evict(self) -> None:
        """Delete the least recently used entries until the root is within ``max_bytes``."""
        with self._lock:
            entries = sorted(self.entries())
            total = sum(size for _, size, _ in entries)
            for _, size, path in entries:
                if total <= self.max_bytes:
                    break
                path.unlink(missing_ok=True)
                total -= size
            self._known_bytes, self._listed_at = total, time.monotonic()


def _listing(folder: str | os.PathLike[str]) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError:  # absent (nothing written yet), or removed meanwhile
        return []
