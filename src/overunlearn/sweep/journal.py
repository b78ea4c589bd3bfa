"""The append-only JSONL journal of a sweep.

Every trial, finished or failed, is one line; so is every reference measurement
(original / ground-truth metrics of a seed) and a header line per sweep run. Lines are
written by one process only (the sweep's parent), each with a single ``write`` followed
by ``flush`` and ``fsync``, under an exclusive ``flock`` on the file so two sweeps cannot
interleave lines in one journal.

Crash safety: a process killed mid-write can leave a *torn* last line (no newline,
not valid JSON). Readers skip any line that does not parse (and count it); before
appending, a writer terminates a torn tail with a newline so the next record starts
on a line of its own. Nothing is ever rewritten or deleted. A trial counts as done
once a ``finished`` line with its id is in the journal, so rerunning a killed sweep
repeats at most the trials that were in flight and never records one twice.

Line kinds (``"kind"``):

* ``"sweep"``: a sweep run started: the spec header, environment, git revision;
* ``"reference"``: ``benchmark.reference(seed)`` for one benchmark configuration and seed;
* ``"trial"``: one trial with its ``status`` (``"finished"`` or ``"failed"``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # POSIX advisory locks; on other systems the journal is not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

FINISHED = "finished"
FAILED = "failed"
#: failures that repeat deterministically: a rerun skips them unless asked to retry
DETERMINISTIC_ERRORS = ("NonFiniteLossError",)


class JournalLockedError(RuntimeError):
    """Another process is writing this journal."""


def _clean(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become ``None`` (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def dumps(record: dict[str, Any]) -> str:
    return json.dumps(_clean(record), sort_keys=True, allow_nan=False, default=str, separators=(",", ":"))


@dataclass
class JournalContents:
    """What a journal holds: parsed records in file order and how many lines were unreadable."""

    records: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: int = 0
    torn_tail: bool = False

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == kind]

    def trials(self) -> list[dict[str, Any]]:
        return self.of_kind("trial")

    def finished_ids(self) -> set[str]:
        return {r["id"] for r in self.trials() if r.get("status") == FINISHED}

    def done_ids(self, retry_failed: bool = False) -> set[str]:
        """Ids a rerun skips: finished, and (unless ``retry_failed``) deterministic failures."""
        done = self.finished_ids()
        if not retry_failed:
            done |= {r["id"] for r in self.trials()
                     if r.get("status") == FAILED and r.get("error_type") in DETERMINISTIC_ERRORS}
        return done

    def latest_trials(self) -> dict[str, dict[str, Any]]:
        """One record per trial id: its finished line if any, else its latest failure."""
        out: dict[str, dict[str, Any]] = {}
        for r in self.trials():
            prev = out.get(r["id"])
            if prev is None or prev.get("status") != FINISHED:
                out[r["id"]] = r
        return out

    def references(self) -> dict[tuple[str, int], dict[str, Any]]:
        out: dict[tuple[str, int], dict[str, Any]] = {}
        for r in self.of_kind("reference"):
            if r.get("status") == FINISHED or (r["benchmark_key"], r["seed"]) not in out:
                out[(r["benchmark_key"], int(r["seed"]))] = r
        return out

    def sweeps(self) -> dict[str, dict[str, Any]]:
        """The latest header of every sweep name."""
        out: dict[str, dict[str, Any]] = {}
        for r in self.of_kind("sweep"):
            out[r["spec"]["name"]] = r
        return out


def read_journal(path: str | Path) -> JournalContents:
    """Parse a journal, skipping (and counting) lines that are not complete JSON objects."""
    path = Path(path)
    out = JournalContents()
    if not path.exists():
        return out
    data = path.read_bytes()
    out.torn_tail = bool(data) and not data.endswith(b"\n")
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            out.bad_lines += 1
            continue
        if not isinstance(rec, dict) or "kind" not in rec:
            out.bad_lines += 1
            continue
        out.records.append(rec)
    return out


class JournalWriter:
    """Appends records to a journal; holds an exclusive lock while open.

    Use as a context manager::

        with JournalWriter(path) as j:
            j.append({"kind": "trial", ...})
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def __enter__(self) -> JournalWriter:
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise JournalLockedError(
                    f"journal {str(self.path)!r} is being written by another sweep; wait for it or use another "
                    "--journal") from None
        self._fd = fd
        # terminate a torn tail (a line cut by a kill) so our first record starts a fresh line
        size = os.fstat(fd).st_size
        if size:
            with open(self.path, "rb") as fh:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    self._write(b"\n")

    def _write(self, data: bytes) -> None:
        assert self._fd is not None, "journal is not open"
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line, then fsync."""
        if "kind" not in record:
            raise ValueError("a journal record needs a 'kind'")
        self._write((dumps(record) + "\n").encode("utf-8"))

    def close(self) -> None:
        if self._fd is not None:
            try:
                if fcntl is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None


# ---------------------------------------------------------------------------------------------
# provenance


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages that change numbers (read from metadata, nothing imported)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("overunlearn", "torch", "torchvision", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # pragma: no cover - optional package missing
            continue
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch.version, "cuda", None):
        out["cuda"] = str(torch.version.cuda)
    return out


def git_revision(start: str | Path | None = None) -> dict[str, Any]:
    """``{"commit": sha, "dirty": bool}`` of the repository holding this package (or ``start``)."""
    where = Path(start) if start is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=30)
        return {"commit": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def environment() -> dict[str, Any]:
    return {"host": socket.gethostname(), "platform": platform.platform(), "pid": os.getpid(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
