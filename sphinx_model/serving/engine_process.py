"""The continuous-batching engine in a process of its own (what vLLM does for the same reason).

In one process the engine's scheduler thread shares the GIL with everything else the server
does in Python (the web framework's requests and streaming, the store, uploads). A decode step
of a small model is hundreds of short torch calls, each of which releases the GIL and must win
it back; while another thread runs Python the step waits for it (CPython's convoy effect), so
the model and the web server take turns instead of sharing the cores. Measured on the demo
model, 2 CPU cores, 8 concurrent requests: a thread burning Python half the time cut the
engine's throughput from 521 to 188 tokens/s; the same load in another process left 533.

`EngineProcess` has the interface of `batcher.ContinuousBatcher` (`prepare`, `submit`, the
job's events, `stats`, `idle`, `close`), so a caller does not know which it has:

  * `prepare` runs in the caller's process and thread (`JobMaker`: images processed once,
    keyed by content; tokenised; the prompt checked against the context), so bad input fails
    before anything is sent;
  * `submit` sends the job to the engine process over a pipe; the pixels of an image that
    process was sent before stay home, and it asks for them only if its image cache let them
    go; a cancel (`jobs.Signal`) is sent the moment it is set;
  * a reader thread puts the engine's pieces and its end on each job's own `events` queue.

If the engine process dies, every job in it fails with one line and the next `submit` starts
it again. Messages are pickled by this module and its own child only (a private socket pair).
"""
from __future__ import annotations

import collections
import dataclasses
import multiprocessing as mp
import os
import pickle
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

from .batcher import ContinuousBatcher
from .jobs import EngineConfig, Job, JobMaker, Signal

READY_TIMEOUT_S = 900.0     # loading a large checkpoint from a slow disk
_SENT_KEYS = 4096           # images whose pixels the engine process was sent (it may still have them)


class EngineProcessError(RuntimeError):
    """The engine process could not start, or stopped (the message is one line)."""


def default_threads() -> int:
    """Intra-op threads for the engine process on CPU: all cores but one, which is left to the
    server's own process (its web framework, store and uploads)."""
    return max(1, (os.cpu_count() or 1) - 1)


class EngineProcess(JobMaker):
    """A `ContinuousBatcher` running in a child process; `loader()` (picklable: a module-level
    function or a partial of one) builds (model, processor) there."""

    def __init__(self, loader: Callable[[], tuple[Any, Any]], config: EngineConfig | None = None,
                 threads: int | None = None, ready_timeout: float = READY_TIMEOUT_S):
        self._loader, self._ready_timeout = loader, ready_timeout
        self.threads = threads or default_threads()   # the child's intra-op threads
        self._jobs: dict[int, Job] = {}
        self._next_id = 0
        self._sent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lock = threading.Lock()                 # jobs, ids, sent keys
        self._pipe = threading.Lock()                 # the pipe's sending end
        self._restart = threading.Lock()
        self._stats_lock = threading.Lock()
        self._stats: queue.Queue = queue.Queue()
        self._closed = False
        self.restarts = -1
        config = config or EngineConfig()
        processor, context_length = self._start(config)
        super().__init__(processor, context_length, config)

    # --- the child --------------------------------------------------------------------------
    def _start(self, config: EngineConfig) -> tuple[Any, int]:
        ctx = mp.get_context("spawn")                 # a fresh interpreter: no forked torch state
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=_engine_main, args=(theirs, self._loader, config, self.threads),
                           name="sphinx-engine", daemon=True)
        proc.start()
        theirs.close()
        try:
            if not ours.poll(self._ready_timeout):
                raise EngineProcessError(f"the model's process did not start within {self._ready_timeout:.0f} s")
            kind, *rest = _recv(ours)
        except (EOFError, OSError) as e:
            proc.join(5)
            raise EngineProcessError(f"the model's process stopped while loading (exit code {proc.exitcode})") from e
        except EngineProcessError:
            proc.terminate()
            raise
        if kind == "failed":
            proc.join(10)
            raise rest[0]
        self._proc, self._conn = proc, ours
        self.restarts += 1
        self._reader = threading.Thread(target=self._read, args=(ours, proc), name="sphinx-engine-reader",
                                        daemon=True)
        self._reader.start()
        return rest[0], rest[1]

    def _read(self, conn: Any, proc: Any) -> None:
        """Put what the engine process says on its jobs' queues, until it stops."""
        while True:
            try:
                kind, *rest = _recv(conn)
            except (EOFError, OSError, pickle.UnpicklingError):
                break
            if kind == "event":
                jid, what, value = rest
                with self._lock:
                    job = self._jobs.get(jid) if what == "piece" else self._jobs.pop(jid, None)
                if job is None:
                    continue
                if what == "piece":
                    job.events.put(("piece", value))
                elif what == "end":
                    job.finish(value)
                else:
                    job.fail(value)
            elif kind == "need":                      # it no longer has an image's tokens: send the pixels
                with self._lock:
                    job = self._jobs.get(rest[0])
                if job is not None:
                    self._send_job(rest[0], job, full=True)
            elif kind == "stats":
                self._stats.put(rest[0])
        proc.join(5)
        with self._lock:
            lost, self._jobs = list(self._jobs.values()), {}
            self._sent.clear()
        if not self._closed:
            error = RuntimeError(f"the model's process stopped (exit code {proc.exitcode}); it is started "
                                 "again for the next request")
            for job in lost:
                job.fail(error)

    # --- the callers' side --------------------------------------------------------------------
    def submit(self, *jobs: Job) -> None:
        """Send jobs to the engine process (starting it again if it stopped)."""
        with self._restart:
            if self._closed:
                raise RuntimeError("the serving engine is closed")
            if not (self._proc.is_alive() and self._reader.is_alive()):
                self._reader.join(10)
                self._start(self.config)
        for job in jobs:
            if not isinstance(job.cancel, Signal):
                raise TypeError("a job for the engine process is cancelled through a serving.Signal")
            with self._lock:
                jid, self._next_id = self._next_id, self._next_id + 1
                self._jobs[jid] = job
            self._send_job(jid, job, full=False)
            job.cancel.on_set(lambda jid=jid, job=job: self._cancel(jid, job))

    def _send_job(self, jid: int, job: Job, full: bool) -> None:
        """The job as the engine process takes it; pixels of images it was sent before are left
        out unless `full`. Pickled outside the job table's lock: the reader keeps streaming."""
        images = []
        with self._lock:
            for im, key in zip(job.images, job.image_keys):
                known = not full and self.config.image_cache_bytes and key in self._sent
                images.append(dataclasses.replace(im, pixels=None) if known else im)
                self._sent[key] = None
                self._sent.move_to_end(key)
            while len(self._sent) > _SENT_KEYS:
                self._sent.popitem(last=False)
        wire = {"ids": job.ids, "images": images, "image_keys": job.image_keys, "keys": job.keys,
                "settings": job.settings, "budget": job.budget, "seed": job.seed}
        self._send(("submit", jid, wire, job.cancel.is_set()))

    def _send(self, message: tuple) -> None:
        data = _dumps(message)
        with self._pipe:
            self._conn.send_bytes(data)

    def _cancel(self, jid: int, job: Job) -> None:
        with self._lock:
            running = not job.done and jid in self._jobs
        if running:
            try:
                self._send(("cancel", jid))
            except OSError:
                pass

    @property
    def stats(self) -> collections.Counter:
        """The engine process's counters (tokens, steps, row_steps, prefilled, reused, ...)."""
        with self._stats_lock:
            while not self._stats.empty():
                self._stats.get_nowait()
            try:
                self._send(("stats",))
            except OSError:
                return collections.Counter()
            try:
                return collections.Counter(self._stats.get(timeout=30))
            except queue.Empty:
                return collections.Counter()

    @property
    def idle(self) -> bool:
        """No job is in the engine process."""
        with self._lock:
            return not self._jobs

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def close(self, timeout: float = 10.0) -> None:
        """Stop the engine process; jobs not finished get an error."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._send(("close",))
        except OSError:
            pass
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
        with self._lock:
            lost, self._jobs = list(self._jobs.values()), {}
        for job in lost:
            job.fail(RuntimeError("the serving engine is closed"))


# --- the engine process ------------------------------------------------------------------------
class _Outbox:
    """A job's `events` in the engine process: each event goes straight back over the pipe."""

    def __init__(self, jid: int, send: Callable[[tuple], None], jobs: dict[int, Job]):
        self.jid, self._send, self._jobs = jid, send, jobs

    def put(self, item: tuple[str, Any]) -> None:
        what, value = item
        if what != "piece":
            self._jobs.pop(self.jid, None)
            if what == "error":
                value = _portable(value)
        self._send(("event", self.jid, what, value))


def _engine_main(conn: Any, loader: Callable[[], tuple[Any, Any]], config: EngineConfig,
                 threads: int | None) -> None:
    from .generation import Generator

    if threads:
        torch.set_num_threads(threads)
    try:
        model, processor = loader()
        generator = Generator(model, processor)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        _send(conn, ("failed", _portable(e)))
        return
    engine = ContinuousBatcher(generator, config)
    lock = threading.Lock()

    def send(message: tuple) -> None:
        with lock:
            _send(conn, message)

    jobs: dict[int, Job] = {}
    send(("ready", processor, generator.context_length))
    while True:
        try:
            kind, *rest = _recv(conn)
        except (EOFError, OSError):
            break                                     # the server went away
        if kind == "submit":
            jid, wire, cancelled = rest
            job = Job(wire["ids"], wire["images"], wire["image_keys"], wire["keys"], wire["settings"],
                      wire["budget"], Signal(), wire["seed"])
            for im, key in zip(job.images, job.image_keys):
                if im.pixels is None:                 # the server thinks this process has it
                    tokens = engine.images.get(key) if config.image_cache_bytes else None
                    if tokens is None:
                        break
                    job.tokens[key] = tokens          # held by the job: eviction cannot take it now
            else:
                if cancelled:
                    job.cancel.set()
                job.events = _Outbox(jid, send, jobs)  # type: ignore[assignment]
                jobs[jid] = job
                engine.submit(job)
                continue
            send(("need", jid))
        elif kind == "cancel":
            job = jobs.get(rest[0])
            if job is not None:
                job.cancel.set()
        elif kind == "stats":
            send(("stats", dict(engine.stats)))
        elif kind == "close":
            break
    engine.close()


# --- the pipe ------------------------------------------------------------------------------------
def _dumps(message: tuple) -> bytes:
    """Plain pickle (tensors as bytes), not multiprocessing's: no shared-memory segment and file
    descriptor per tensor for a few megabytes of pixels."""
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def _send(conn: Any, message: tuple) -> None:
    conn.send_bytes(_dumps(message))


def _recv(conn: Any) -> tuple:
    return pickle.loads(conn.recv_bytes())


def _portable(error: BaseException) -> BaseException:
    """The error itself if it survives pickling, else a RuntimeError with its first line."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any exception type may refuse pickling
        first = str(error).splitlines()[0] if str(error) else ""
        return RuntimeError(f"{type(error).__name__}: {first}")


def seeded(seed: int, load: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`load(*args, **kwargs)` after seeding torch: a random-init preset is the same noise in the
    engine process as it would be in this one (a loader is `functools.partial(seeded, ...)`)."""
    torch.manual_seed(seed)
    return load(*args, **kwargs)
