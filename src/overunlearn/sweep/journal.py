"""The append-only JSONL journal of a sweep.

Every trial, finished or failed, is one line; so is every reference measurement
(original / ground-truth metrics of a seed) and a header line per sweep run. Lines are
written by one process only (the sweep's parent), each with a single ``write`` followed
by ``flush`` and ``fsync``, under an exclusive ``flock`` on the file so two sweeps cannot
interleave lines in one journal.

Crash safety: a process killed mid-write can leave a *torn* last line (no newline,
not valid JSON). Readers skip any line that does not parse or is not a valid record (missing or
mistyped fields), each with a message naming the file, the line and the reason; before
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

from overunlearn.errors import OverunlearnError

try:  # POSIX advisory locks; on other systems the journal is not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

FINISHED = "finished"
FAILED = "failed"
#: failures that repeat deterministically: a rerun skips them unless asked to retry
DETERMINISTIC_ERRORS = ("NonFiniteLossError",)


class JournalLockedError(OverunlearnError, RuntimeError):
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


#: statuses a trial or reference record may have
STATUSES = (FINISHED, FAILED)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num_or_none(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _check_metrics(v: Any) -> str | None:
    if not isinstance(v, dict) or not all(isinstance(k, str) and _is_num_or_none(x) for k, x in v.items()):
        return "'metrics' must be a table of metric name -> number"
    return None


#: budget key -> check of its value (the fields of :class:`overunlearn.engine.Budget`; an infinite
#: ``seconds`` is written as ``null``, see :func:`_clean`)
_BUDGET_VALUES: dict[str, Any] = {"epochs": _is_int, "steps": _is_int, "seconds": _is_num_or_none}
_BUDGET_WHAT = "a table of integer 'epochs' / 'steps' and a number of 'seconds'"


def _budget_problem(v: Any) -> str | None:
    """What ``v`` must be when it is not a budget that reports can compute with; ``None``: it is one."""
    if not isinstance(v, dict):
        return f"{_BUDGET_WHAT}, not a {type(v).__name__}"
    for key, value in v.items():  # a key of a later version is no problem: nothing here reads it
        check = _BUDGET_VALUES.get(key)
        if check is not None and not check(value):
            return f"{_BUDGET_WHAT} (it has {key!r} = {value!r:.40})"
    return None


def _check_budget(v: Any) -> str | None:
    why = _budget_problem(v)
    return None if why is None else f"'budget' must be {why}"


def _check_benchmark(v: Any) -> str | None:
    if not isinstance(v, dict) or not isinstance(v.get("name"), str) or not isinstance(v.get("options", {}), dict):
        return "'benchmark' must be a table with a string 'name' and a table 'options'"
    return None


#: field -> (check, what it must be); a field that is present must pass its check
_TYPED: dict[str, tuple[Any, str]] = {
    "id": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "config_key": (lambda v: isinstance(v, str), "a string"),
    "benchmark_key": (lambda v: isinstance(v, str), "a string"),
    "method": (lambda v: isinstance(v, str), "a string"),
    "sweep": (lambda v: isinstance(v, str), "a string"),
    "setting": (lambda v: isinstance(v, str), "a string"),
    "seed": (_is_int, "an integer"),
    "status": (lambda v: v in STATUSES, f"one of {list(STATUSES)}"),
    "config": (lambda v: isinstance(v, dict), "a table"),
    "hyper": (lambda v: isinstance(v, dict), "a table"),
    "engine": (lambda v: isinstance(v, dict), "a table"),
    "error": (lambda v: isinstance(v, str), "a string"),
    "error_type": (lambda v: isinstance(v, str), "a string"),
    "steps": (lambda v: v is None or _is_int(v), "an integer"),
    "seconds": (_is_num_or_none, "a number"),
    # provenance that resuming and reports compare or print (sweep --rerun-stale, mixed-arithmetic notes)
    "code": (lambda v: v is None or isinstance(v, str), "a string (the source fingerprint)"),
    "arithmetic": (lambda v: v is None or isinstance(v, str), "a string"),
    "torch_threads": (lambda v: v is None or _is_int(v), "an integer"),
    "metric_specs": (lambda v: isinstance(v, list) and all(
        isinstance(m, dict) and isinstance(m.get("name"), str) and m.get("direction") in ("min", "max")
        for m in v), "a list of {name, direction} tables"),
}
_REQUIRED = {"trial": ("id", "status"), "reference": ("benchmark_key", "seed", "status"), "sweep": ("spec",)}


def _check_reference(v: Any) -> str | None:
    if not isinstance(v, dict) or not all(isinstance(d, dict) and all(_is_num_or_none(x) for x in d.values())
                                          for d in v.values()):
        return "'reference' must be a table of kind -> metric -> number"
    return None


def _check_spec(v: Any) -> str | None:
    """The parts of a sweep header that reports read."""
    if not isinstance(v, dict) or not isinstance(v.get("name"), str):
        return "'spec' must be a table with a string 'name'"
    settings = v.get("settings", [])
    if not isinstance(settings, list):
        return "'spec.settings' must be a list"
    for i, s in enumerate(settings):
        if not isinstance(s, dict) or not isinstance(s.get("name"), str):
            return f"'spec.settings[{i}]' must be a table with a string 'name'"
        if not isinstance(s.get("seeds", []), list) or not all(_is_int(x) for x in s.get("seeds", [])):
            return f"'spec.settings[{i}].seeds' must be a list of integers"
        for key in ("grids", "fixed", "budget", "benchmark_options"):
            if not isinstance(s.get(key, {}), dict):
                return f"'spec.settings[{i}].{key}' must be a table"
        why = _budget_problem(s.get("budget", {}))
        if why is not None:
            return f"'spec.settings[{i}].budget' must be {why}"
        for key in ("grids", "fixed"):
            if not all(isinstance(t, dict) for t in s.get(key, {}).values()):
                return f"'spec.settings[{i}].{key}' must be a table of method -> table"
        if not all(isinstance(v, list) for t in s.get("grids", {}).values() for v in t.values()):
            return f"'spec.settings[{i}].grids' must hold lists of values"
        if not isinstance(s.get("methods", []), list):
            return f"'spec.settings[{i}].methods' must be a list"
    metrics = v.get("metrics", [])
    if not isinstance(metrics, list) or not all(isinstance(m, dict) and isinstance(m.get("name"), str)
                                                and m.get("direction") in ("min", "max") for m in metrics):
        return "'spec.metrics' must be a list of {name, direction} tables"
    report = v.get("report", {})
    if not isinstance(report, dict) or not isinstance(v.get("benchmark", {}), dict):
        return "'spec.report' and 'spec.benchmark' must be tables"
    if not isinstance(report.get("metrics", []), list) or not all(isinstance(m, str) for m in report.get("metrics", [])):
        return "'spec.report.metrics' must be a list of metric names"
    return None


def record_problem(rec: Any) -> str | None:
    """Why a parsed journal line cannot be used (``None``: it can). Checks the kind, the fields every
    reader needs, and the type of every known field that is present."""
    if not isinstance(rec, dict):
        return f"a journal line must be a JSON object, not {type(rec).__name__}"
    kind = rec.get("kind")
    if kind not in _REQUIRED:
        return f"unknown record kind {kind!r} (expected one of {sorted(_REQUIRED)})"
    missing = [k for k in _REQUIRED[kind] if k not in rec]
    if missing:
        return f"a {kind!r} record without {', '.join(repr(k) for k in missing)}"
    for key, (ok, what) in _TYPED.items():
        if key in rec and not ok(rec[key]):
            return f"field {key!r} = {rec[key]!r:.60} must be {what}"
    for key, check in (("metrics", _check_metrics), ("benchmark", _check_benchmark), ("budget", _check_budget),
                       ("reference", _check_reference), ("spec", _check_spec)):
        if key in rec:
            why = check(rec[key])
            if why is not None:
                return why
    return None


@dataclass
class JournalContents:
    """What a journal holds: the valid records in file order, and what was wrong with the others.

    ``problems`` has one message per skipped line (file, line number, reason); ``conflicts`` one per
    trial recorded as finished more than once with different metrics (the first is used).
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: int = 0
    torn_tail: bool = False
    path: str = ""
    problems: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    lines: dict[int, int] = field(default_factory=dict)  # id(record) -> 1-based line number

    def line_of(self, rec: dict[str, Any]) -> int | None:
        """The line number of a record read from the file."""
        return self.lines.get(id(rec))

    def warnings(self) -> list[str]:
        """Every problem and conflict, one message each."""
        return [*self.problems, *self.conflicts]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == kind]

    def trials(self) -> list[dict[str, Any]]:
        return self.of_kind("trial")

    def finished_ids(self) -> set[str]:
        return {r["id"] for r in self.trials() if r.get("status") == FINISHED}

    def done_ids(self, retry_failed: bool = False) -> set[str]:
        """Ids a rerun skips: finished, and (unless ``retry_failed``) deterministic failures.

        Any other failure (an ordinary exception, a dead worker, a setup step) is retried."""
        done = self.finished_ids()
        if not retry_failed:
            done |= {r["id"] for r in self.trials()
                     if r.get("status") == FAILED and r.get("error_type") in DETERMINISTIC_ERRORS}
        return done

    def latest_trials(self) -> dict[str, dict[str, Any]]:
        """One record per trial id: its finished line if any, else its latest failure. Of several finished
        lines the first is used, unless a later one was computed by other code (``"code"``: a rerun of a
        stale result, ``sweep --rerun-stale``), which then replaces it."""
        out: dict[str, dict[str, Any]] = {}
        for r in self.trials():
            prev = out.get(r["id"])
            if prev is None or prev.get("status") != FINISHED or (
                    r.get("status") == FINISHED and r.get("code") != prev.get("code")):
                out[r["id"]] = r
        return out

    def references(self) -> dict[tuple[str, int], dict[str, Any]]:
        """One record per (benchmark key, seed): its first finished line if any, else its latest failure."""
        out: dict[tuple[str, int], dict[str, Any]] = {}
        for r in self.of_kind("reference"):
            key = (r["benchmark_key"], int(r["seed"]))
            prev = out.get(key)
            if prev is None or prev.get("status") != FINISHED:
                out[key] = r
        return out

    def sweeps(self) -> dict[str, dict[str, Any]]:
        """The latest header of every sweep name."""
        out: dict[str, dict[str, Any]] = {}
        for r in self.of_kind("sweep"):
            out[r["spec"]["name"]] = r
        return out

    def _find_conflicts(self) -> None:
        """Trials finished more than once by the same code with different metrics: the first line is used,
        each is reported (a rerun by other code is no conflict: it replaces the older line)."""
        first: dict[tuple[str, Any], dict[str, Any]] = {}
        for r in self.trials():
            if r.get("status") != FINISHED:
                continue
            prev = first.setdefault((r["id"], r.get("code")), r)
            if prev is not r and _clean(prev.get("metrics")) != _clean(r.get("metrics")):
                self.conflicts.append(
                    f"journal {self.path}: trial {r['id']} is recorded as finished on lines {self.line_of(prev)} and "
                    f"{self.line_of(r)} with different metrics ({prev.get('metrics')} vs {r.get('metrics')}); "
                    f"line {self.line_of(prev)} is used. Two runs wrote the same trial: check how this journal was "
                    "assembled")


def read_journal(path: str | Path) -> JournalContents:
    """Parse a journal; skip (and explain) every line that is not a valid record.

    A line is skipped when it is not JSON, not an object, of an unknown kind, lacks a field its
    kind needs, or has a known field of the wrong type; ``problems`` names its line and why.
    """
    path = Path(path)
    out = JournalContents(path=str(path))
    if not path.exists():
        return out
    data = path.read_bytes()
    out.torn_tail = bool(data) and not data.endswith(b"\n")
    raws = data.split(b"\n")
    for n, raw in enumerate(raws, start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            torn = out.torn_tail and n == len(raws)
            why = "an incomplete last line (a write cut by an interrupted run)" if torn else f"not valid JSON ({exc})"
            out.bad_lines += 1
            out.problems.append(f"journal {path} line {n}: skipped: {why}")
            continue
        why = record_problem(rec)
        if why is not None:
            out.bad_lines += 1
            out.problems.append(f"journal {path} line {n}: skipped: {why}")
            continue
        out.lines[id(rec)] = n
        out.records.append(rec)
    out._find_conflicts()
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
        self._torn = False

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
                    f"journal {str(self.path)!r} is being written by another sweep; wait for it, or write to "
                    "another journal (sweep: --journal; bench commands: another --out)") from None
        self._fd = fd
        # a torn tail (a line cut by a kill) is terminated by the first append, so that the file can be
        # read under the lock first (and the torn line still reads as the incomplete last line it is)
        size = os.fstat(fd).st_size
        self._torn = False
        if size:
            with open(self.path, "rb") as fh:
                fh.seek(size - 1)
                self._torn = fh.read(1) != b"\n"

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
        line = (dumps(record) + "\n").encode("utf-8")
        self._write(b"\n" + line if self._torn else line)
        self._torn = False

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


#: the package sources that determine a trial's numbers (relative to the package; globs allowed)
CODE_PATHS = ["engine/*.py", "batching.py", "problem.py", "structure.py", "methods/*.py",
              "linalg/*.py", "linalg/blocks/*.py", "models/*.py", "benchmarks/*.py", "training/*.py", "data/*.py", "sweep/worker.py"]


def code_fingerprint() -> str:
    """A hash of torch's version and of the sources that determine a trial's numbers (:data:`CODE_PATHS`).

    Every record a sweep writes carries it as ``"code"``; a finished trial with another fingerprint was
    computed by other code, and resuming says so (or reruns it). The sources of loaded plugin modules
    (:func:`overunlearn.plugins.active_plugins`) count too: editing a plugin's method changes its numbers."""
    import hashlib
    import inspect
    import sys

    from overunlearn.plugins import active_plugins
    from overunlearn.storage import source_fingerprint

    base = source_fingerprint(CODE_PATHS)
    h = hashlib.sha256(base.encode())
    extra = False
    for name in sorted(active_plugins()):
        module = sys.modules.get(name)
        try:
            path = inspect.getsourcefile(module) if module is not None else None
        except TypeError:  # a built-in or namespace module: no source to hash
            path = None
        if path and Path(path).is_file():
            h.update(name.encode())
            h.update(Path(path).read_bytes())
            extra = True
    return h.hexdigest()[:12] if extra else base


def stale_trials(contents: JournalContents, ids: set[str], code: str) -> dict[str, str]:
    """Of the finished trials ``ids``, those recorded by other code: id -> its fingerprint (``"unknown"``
    for records written before fingerprints were recorded)."""
    out: dict[str, str] = {}
    for rid, rec in contents.latest_trials().items():
        if rid in ids and rec.get("status") == FINISHED and rec.get("code") != code:
            out[rid] = str(rec.get("code") or "unknown")
    return out


def describe_stale(stale: dict[str, str], code: str, journal: str | Path, rerun: bool) -> str:
    """One message naming how many finished trials of which code versions are reused (or rerun)."""
    counts: dict[str, int] = {}
    for fp in stale.values():
        counts[fp] = counts.get(fp, 0) + 1
    versions = ", ".join(f"{n} by {fp}" for fp, n in sorted(counts.items()))
    if rerun:
        return (f"journal {journal}: rerunning {len(stale)} finished trial(s) recorded by other code ({versions}; "
                f"this code is {code})")
    return (f"journal {journal}: reusing {len(stale)} finished trial(s) recorded by other code ({versions}; this "
            f"code is {code}, source fingerprint of torch and {', '.join(CODE_PATHS)}); pass --rerun-stale to "
            "recompute them with this code")
