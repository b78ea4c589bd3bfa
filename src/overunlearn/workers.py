"""CPU work split over worker processes (one process per shard, one pipe back from each), or over
threads where processes cannot be used.

Used by the ensemble trainer (``training/ensemble.py``), which shards one training job over forked
workers; trials of sweeps and bench commands run in the sweep's executors (``sweep/executors.py``),
whose spawned pool calls :func:`exit_with_parent` from here. Small PyTorch models spend much of each step in Python dispatch, so threads
of one process take turns on the GIL; processes do not. On Linux the workers are started with
``fork`` (no re-import of ``__main__``, milliseconds to start; like PyTorch's ``DataLoader``
workers they use the CPU only, with one intra-op thread each). Elsewhere, or inside a daemon
process, callers use threads instead (:func:`can_start_processes`).

What the parent guarantees:

* it waits on every pipe at once, and a pipe that closes without an ``"end"`` message means the
  worker died (killed, out of memory): that is noticed at once, whatever the others are doing;
* after one worker fails the others run to the end (their results are handed over, so nothing
  finished is lost), then the first failure is raised here with its own type where it survives a
  pickle round trip, with the worker's traceback as a note;
* workers that have not reported within :data:`WORKER_START_TIMEOUT_S` (a fork that deadlocked on
  a lock another thread held) are an error, not a hang;
* the workers are terminated if anything goes wrong in the parent (Ctrl-C included), and a worker
  whose parent disappeared stops at its next message.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch

#: seconds a worker process may take to report that it started; a fork that deadlocked on a lock
#: another thread of this process held would otherwise wait for ever
WORKER_START_TIMEOUT_S = 120.0


def start_method() -> str:
    """``fork`` on Linux, ``spawn`` elsewhere."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


def can_start_processes() -> bool:
    """Whether worker processes are the default: Linux (``fork``), and this process may have children."""
    return start_method() == "fork" and not mp.current_process().daemon


def exit_with_parent(parent_pid: int | None = None) -> None:
    """Make this (worker) process die with its parent: on Linux the kernel sends it SIGTERM when the parent
    exits (``prctl(PR_SET_PDEATHSIG)``), so a sweep killed by the OOM killer leaves no orphan running.
    ``parent_pid``: exit at once if the parent is already gone (it may have died before the call)."""
    import signal

    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no libc prctl: workers only notice at a send
            pass
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


class Channel:
    """A worker's end of its pipe: ``send(kind, payload)`` messages to the parent."""

    def __init__(self, conn: Any, parent: int) -> None:
        self._conn, self._parent = conn, parent

    def parent_alive(self) -> bool:
        return os.getppid() == self._parent

    def send(self, kind: str, payload: Any = None) -> None:
        """Send one message; a worker whose parent is gone exits instead."""
        if not self.parent_alive():  # pragma: no cover - only when the parent was killed
            os._exit(1)
        self._conn.send((kind, payload))


def _child(target: Callable[[Any, Channel], None], shard: Any, conn: Any,
           parent: int | None = None) -> None:  # pragma: no cover - child
    exit_with_parent(parent)  # a parent killed (OOM killer) takes its workers with it
    chan = Channel(conn, os.getppid())
    torch.set_num_threads(1)
    try:
        conn.send(("started", None))
        target(shard, chan)
        conn.send(("end", None))
    except BaseException as exc:
        tb = traceback.format_exc()
        try:  # the exception itself where it survives a round trip, else only its traceback text
            pickle.loads(pickle.dumps(exc))
            conn.send(("error", (exc, tb)))
        except Exception:
            conn.send(("error", (None, tb)))
    finally:
        conn.close()


def run_in_processes(target: Callable[[Any, Channel], None], shards: Sequence[Any],
                     on_message: Callable[[int, str, Any], None], *, name: str = "worker",
                     label: str | None = None, fallback_hint: str = "") -> None:
    """Run ``target(shards[w], channel)`` in one process per shard and return when all have ended.

    Every message a worker sends with ``channel.send(kind, payload)`` is handed to
    ``on_message(w, kind, payload)`` in this process, in order per worker. ``name`` names the
    processes (``overunlearn-<name>-<w>``), ``label`` (default ``name``) the workers in errors;
    ``fallback_hint`` is appended to the start-timeout error (e.g. how to use threads instead).

    Raises:
        the first worker's exception (its type where it pickles, else ``RuntimeError``), with the
        worker's traceback as a note; ``RuntimeError`` for a worker that died without a word or
        did not start in time.
    """
    from multiprocessing.connection import wait

    label = label or name
    ctx = mp.get_context(start_method())
    procs: list[Any] = []
    readers: dict[Any, int] = {}
    started: set[int] = set()
    failure: BaseException | None = None
    try:
        for w, shard in enumerate(shards):
            r, wconn = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, daemon=True, name=f"overunlearn-{name}-{w}", args=(target, shard, wconn, os.getpid()))
            p.start()
            wconn.close()  # the child holds the write end; a dead child then reads as EOF here
            procs.append(p)
            readers[r] = w
        t_start = time.monotonic()
        live = dict(readers)
        while live:
            ready = wait(list(live), timeout=5.0)
            if len(started) < len(procs) and time.monotonic() - t_start > WORKER_START_TIMEOUT_S:
                raise RuntimeError(f"{label} worker processes did not start within {WORKER_START_TIMEOUT_S:.0f} s"
                                   + (f"; {fallback_hint}" if fallback_hint else ""))
            for conn in ready:
                w = live[conn]
                try:
                    kind, payload = conn.recv()
                except (EOFError, OSError):  # the worker is gone without a word
                    del live[conn]
                    procs[w].join(timeout=5)
                    failure = failure or RuntimeError(
                        f"{label} worker process {w} died (exit code {procs[w].exitcode}) without reporting an error")
                    continue
                started.add(w)  # any message means the worker is running
                if kind == "started":
                    continue
                if kind == "end":
                    del live[conn]
                elif kind == "error":
                    del live[conn]
                    exc, tb = payload
                    if failure is None:
                        if not isinstance(exc, BaseException):
                            exc = RuntimeError(f"{label} worker process {w} failed")
                        note = f"in {label} worker process {w}:\n{tb}"
                        if hasattr(exc, "add_note"):  # Python >= 3.11
                            exc.add_note(note)
                        else:  # pragma: no cover
                            exc = RuntimeError(f"{exc!r} {note}")
                        failure = exc
                else:
                    on_message(w, kind, payload)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
        for r in readers:
            r.close()
    if failure is not None:
        raise failure


class TaskCounter:
    """Hands out the task numbers ``0 .. n - 1`` to workers, each number once, in order.

    Workers that pull their next task when they finish one balance themselves: with tasks sorted
    from the most to the least work, the workers end within about one small task of each other,
    without an estimate of what each task costs. Create it before the workers start: with
    ``processes`` the count lives in shared memory (``multiprocessing.Value``) that worker processes
    forked after its creation share; otherwise it is a counter behind a thread lock.

    Raises:
        OSError: ``processes`` where the platform has no POSIX shared memory or semaphores (use
            threads there).
    """

    #: seconds a worker waits for the shared counter's lock; only a worker killed while holding it
    #: (a window of microseconds) makes the others wait that long, and they then fail instead of hanging
    LOCK_TIMEOUT_S = 60.0

    def __init__(self, n: int, processes: bool) -> None:
        self.n = int(n)
        if processes:
            self._shared: Any = mp.get_context(start_method()).Value("q", 0)
            self._lock: Any = None
        else:
            import threading

            self._shared = None
            self._lock = threading.Lock()
            self._local = 0

    def next(self) -> int | None:
        """The next task number, or ``None`` when every task has been handed out (or :meth:`stop`)."""
        if self._shared is not None:
            lock = self._shared.get_lock()
            if not lock.acquire(timeout=self.LOCK_TIMEOUT_S):
                raise RuntimeError("a worker holding the task counter's lock died; giving up on the remaining tasks")
            try:
                i = int(self._shared.value)
                self._shared.value = i + 1
            finally:
                lock.release()
        else:
            with self._lock:
                i = self._local
                self._local = i + 1
        return i if i < self.n else None

    def stop(self) -> None:
        """Hand out no further task (e.g. after a failure: the others then finish their current one)."""
        if self._shared is not None:
            lock = self._shared.get_lock()
            if lock.acquire(timeout=self.LOCK_TIMEOUT_S):
                try:
                    self._shared.value = max(int(self._shared.value), self.n)
                finally:
                    lock.release()
        else:
            with self._lock:
                self._local = max(self._local, self.n)


def run_in_threads(target: Callable[[Any], None], shards: Sequence[Any]) -> None:
    """Run ``target(shard)`` for every shard in threads of this process, one torch intra-op thread
    each (kernels release the GIL), and re-raise the first error after all have ended. The
    fallback where worker processes cannot be used."""
    import threading

    errors: list[BaseException] = []

    def body(shard: Any) -> None:
        try:
            torch.set_num_threads(1)
            target(shard)
        except BaseException as exc:  # pragma: no cover - re-raised below
            errors.append(exc)

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        threads = [threading.Thread(target=body, args=(sh,), daemon=True) for sh in shards]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(prev)
    if errors:
        raise errors[0]


__all__ = ["Channel", "TaskCounter", "WORKER_START_TIMEOUT_S", "can_start_processes", "exit_with_parent", "run_in_processes", "run_in_threads",
           "start_method"]
