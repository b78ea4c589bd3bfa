"""Atomic writes, safe loading and content-keyed caching of expensive artefacts.

Every file is written to a temporary name in the same directory, flushed, fsynced and
renamed over the target, so an interrupted run never leaves a truncated file. Tensors
and state dicts are loaded with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def default_cache_dir() -> Path:
    """The cache root of trained models and signals: ``$OVERUNLEARN_CACHE`` if set, else
    ``$XDG_CACHE_HOME/overunlearn`` if ``XDG_CACHE_HOME`` is set, else ``~/.cache/overunlearn``.

    An empty variable counts as unset, and so does a relative ``XDG_CACHE_HOME`` (the XDG base directory
    specification says to ignore it). The CLI's ``--cache`` options default to this root.
    """
    env = os.environ.get("OVERUNLEARN_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "overunlearn"
    return Path.home() / ".cache" / "overunlearn"


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: the process's umask, read once at import (reading it means setting it, which is not thread-safe)
_UMASK = _read_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename: readers see the old file or the
    whole new one, never a part. The file gets the usual permissions (``0o666`` less the umask), not the
    temporary file's private ``0o600``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def safe_torch_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load tensors / a state dict with ``weights_only=True`` (no code in the file runs).

    Raises:
        CacheFileError: the file cannot be read as tensors (truncated, corrupt, or holding other Python
            objects); the message names the file and says what to do, instead of torch's advice to
            retry with ``weights_only=False``, which would run whatever the file holds.
    """
    from overunlearn.errors import CacheFileError

    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (OSError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise CacheFileError(f"cannot load {path}: the file is truncated, corrupt or holds something other than "
                             f"tensors ({type(exc).__name__}); delete it and it is rebuilt", str(path)) from None


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if missing) while the block runs; blocks until
    another process holding it releases it. Runs sharing a cache use it so that each model is trained
    once and no update is lost. A no-op where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def stable_hash(obj: Any, length: int = 12) -> str:
    """A short hex digest of a JSON-serialisable object (dict keys sorted)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def source_fingerprint(paths: list[str]) -> str:
    """A hash of torch's version and of the package sources at ``paths`` (relative to the package,
    glob patterns allowed, e.g. ``"methods/*.py"``). Caches of computed results include it, so
    that editing the code that produced them recomputes instead of silently reusing old numbers."""
    import overunlearn

    root = Path(overunlearn.__file__).resolve().parent
    files: list[Path] = []
    for p in paths:
        found = sorted(root.glob(p)) if any(c in p for c in "*?[") else [root / p]
        if not any(f.is_file() for f in found):  # a renamed module must not silently leave the hash
            raise FileNotFoundError(f"source_fingerprint: {p!r} names no file under {root}")
        files += found
    h = hashlib.sha256(torch.__version__.encode())
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes() if f.exists() else b"")
    return h.hexdigest()[:12]
