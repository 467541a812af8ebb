"""Background jobs: attribution, training, evaluation and sweeps run off the request thread, one heavy
job at a time (the rest wait in a visible queue), cancellable, with live progress and a JSON status file
per job so a reopened page, a second session or a restarted process sees what finished or was cut short.

`fn(reporter)` does the work, reporting through the engine's one protocol (`infra.progress.Reporter`): a
`JobReporter` keeps progress, training steps and messages on the job and is cancelled when the job is.
Status files are written atomically (`infra.files`) with a `checksum` field; a file that does not parse or
match it is ignored with a warning, never trusted.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..infra import files
from ..infra.processes import pid_alive, process_start
from ..infra.progress import Reporter

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running")
FINISHED = ("done", "failed", "cancelled", "interrupted")
PROCESS_TOKEN = uuid.uuid4().hex[:12]  # names this process in status files (a pid alone is reused)
_ids = itertools.count(1)


def write_status(path: Path, obj: dict) -> None:
    """A job's status file: atomic, with a `checksum` field over the rest (checked by every reader)."""
    files.write_json(path, files.with_checksum(obj), checksum=False)


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return {"type": type(value).__name__}


@dataclass(eq=False)
class Job:
    """One unit of background work and everything a UI shows about it."""

    id: str
    kind: str
    key: str | None = None
    status: str = "queued"  # queued | running | done | failed | cancelled | interrupted
    stage: str = ""
    step: int = 0
    total: int = 0
    log: deque = field(default_factory=lambda: deque(maxlen=1000))  # bounded: training steps, losses
    result: Any = None  # in memory only; `info` is what persists
    info: dict = field(default_factory=dict)  # JSON summary of the result (paths, counts)
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    owner: dict = field(default_factory=lambda: {"pid": os.getpid(), "token": PROCESS_TOKEN, "started": process_start(os.getpid())})
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)
    done_event: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def cancel(self) -> None:
        """Ask the job to stop: a queued job is dropped, a running one stops at its next check."""
        self.cancel_event.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has finished (True) or `timeout` seconds passed (False)."""
        return self.done_event.wait(timeout)

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "key": self.key, "status": self.status, "stage": self.stage,
                "step": self.step, "total": self.total, "log": list(self.log), "info": self.info, "error": self.error,
                "created": self.created, "started": self.started, "finished": self.finished, "owner": self.owner}

    @classmethod
    def from_dict(cls, d: dict) -> "Job":
        job = cls(d["id"], d["kind"], d.get("key"), d.get("status", "failed"), d.get("stage", ""), d.get("step", 0),
                  d.get("total", 0), deque(d.get("log", []), maxlen=1000), None, d.get("info") or {}, d.get("error"),
                  d.get("created", 0.0), d.get("started"), d.get("finished"), d.get("owner") or {})
        if not job.active:
            job.done_event.set()
        return job


class JobReporter(Reporter):
    """The reporter handed to a job function: progress, training steps and messages go on the job (and its
    status file); it is cancelled when the job is."""

    def __init__(self, runner: "JobRunner", job: Job):
        super().__init__(job.cancel_event)
        self.runner, self.job = runner, job

    def phase(self, name: str, total: int | None = None) -> None:
        self.update(0, total or 0, name)

    def progress(self, done: int, total: int, stage: str = "") -> None:
        self.update(int(done), total, stage)

    def step(self, entry: dict) -> None:
        self.log(entry)

    def say(self, message: str) -> None:
        """A message shows as the job's stage (its first line)."""
        self.stage(str(message).strip().splitlines()[0][:120] if str(message).strip() else "")

    def update(self, done: int, total: int | None = None, stage: str | None = None) -> None:
        with self.runner._lock:
            self.job.step = done
            if total is not None:
                self.job.total = int(total)
            if stage is not None:
                self.job.stage = stage
        self.runner._persist(self.job)

    def log(self, entry: dict) -> None:
        with self.runner._lock:
            self.job.log.append(_jsonable(dict(entry)))
            if "step" in entry:
                self.job.step = int(entry["step"])
        self.runner._persist(self.job)

    def stage(self, stage: str) -> None:
        self.update(self.job.step, None, stage)


class JobRunner:
    """Runs heavy jobs one at a time on a worker thread (later ones wait in a queue whose positions the UI
    shows) and light jobs at once on their own thread. Status files live in `<cache_dir>/jobs/`."""

    def __init__(self, cache_dir: str | Path | None = None, *, max_log: int = 1000, keep: int = 200,
                 write_every: float = 0.5):
        self.dir = Path(cache_dir) / "jobs" if cache_dir is not None else None
        self.max_log, self.keep, self.write_every = max_log, keep, write_every
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._jobs: dict[str, Job] = {}
        self._queue: list[Job] = []
        self._written: dict[str, float] = {}
        self._worker: threading.Thread | None = None
        self._closed = False
        self.recovered = self._recover()

    # -- submitting and looking up ----------------------------------------------------------------
    def submit(self, kind: str, fn: Callable[[JobReporter], Any], key: str | None = None, *,
               heavy: bool = True, describe: Callable[[Any], dict] | None = None) -> Job:
        """Queue `fn(reporter)`. With a `key`, an unfinished job of the same kind and key is
        returned instead of starting a second one (two sessions asking for one attribution share it)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("The job runner is shut down.")
            if key is not None:
                for job in self._jobs.values():
                    if job.kind == kind and job.key == key and job.active:
                        return job
            job = Job(f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{next(_ids)}-{uuid.uuid4().hex[:4]}", kind, key)
            job.log = deque(maxlen=self.max_log)
            job._fn, job._describe = fn, describe  # type: ignore[attr-defined]
            self._jobs[job.id] = job
            if heavy:
                self._queue.append(job)
                self._ensure_worker()
                self._wake.notify_all()
        self._persist(job, force=True)
        if not heavy:
            threading.Thread(target=self._run, args=(job,), name=f"job-{job.id}", daemon=True).start()
        return job

    def get(self, job_id: str | None) -> Job | None:
        """A job of this process, or one read from its status file (another process, or before a restart)."""
        if not job_id:
            return None
        with self._lock:
            if job_id in self._jobs:
                return self._jobs[job_id]
        if self.dir is not None and (path := self.dir / f"{Path(job_id).name}.json").exists():
            return self._read(path)
        return None

    def position(self, job: Job) -> int | None:
        """1 for the next heavy job to run, 2 for the one after...; None when not waiting."""
        with self._lock:
            return self._queue.index(job) + 1 if job in self._queue else None

    def running(self) -> Job | None:
        with self._lock:
            return next((j for j in self._jobs.values() if j.status == "running"), None)

    def jobs(self, kind: str | None = None, *, include_files: bool = True) -> list[Job]:
        """Jobs newest first: this process's, plus finished ones from status files (other sessions, runs)."""
        with self._lock:
            found = dict(self._jobs)
        if include_files and self.dir is not None and self.dir.exists():
            for path in self.dir.glob("*.json"):
                if path.stem not in found and (job := self._read(path)) is not None:
                    found[job.id] = job
        out = [j for j in found.values() if kind is None or j.kind == kind]
        return sorted(out, key=lambda j: j.created, reverse=True)

    def latest(self, kind: str, key: str | None = None, status: tuple[str, ...] = ("done",)) -> Job | None:
        return next((j for j in self.jobs(kind) if (key is None or j.key == key) and j.status in status), None)

    def status(self, job: Job) -> dict:
        """What a UI shows: the job's fields plus its place in the queue and what runs before it."""
        d = job.to_dict()
        d["position"] = self.position(job)
        current = self.running()
        d["running_now"] = current.kind if current is not None and current is not job else None
        return d

    def cancel(self, job_id: str) -> bool:
        job = self.get(job_id)
        if job is None or not job.active:
            return False
        job.cancel()
        with self._lock:
            if job in self._queue:  # never started: finish it now
                self._queue.remove(job)
                self._finish(job, "cancelled", "Cancelled before it started.")
        return True

    def shutdown(self, wait: float = 0.0) -> None:
        """Cancel everything and stop the worker (tests, app close)."""
        with self._lock:
            self._closed = True
            jobs = list(self._jobs.values())
            self._wake.notify_all()
        for job in jobs:
            if job.active:
                self.cancel(job.id)
        if wait and self._worker is not None:
            self._worker.join(wait)

    # -- running ---------------------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._loop, name="neurontune-jobs", daemon=True)
            self._worker.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if self._closed and not self._queue:
                    return
                job = self._queue.pop(0)
            self._run(job)

    def _run(self, job: Job) -> None:
        with self._lock:
            if job.cancel_event.is_set():
                if job.active:
                    self._finish(job, "cancelled", "Cancelled before it started.")
                return
            job.status, job.started = "running", time.time()
        self._persist(job, force=True)
        try:
            result = job._fn(JobReporter(self, job))  # type: ignore[attr-defined]
        except BaseException as exc:  # noqa: BLE001 - a job's failure is reported, never raised in the worker
            if job.cancel_event.is_set():
                self._finish(job, "cancelled", "Stopped by the user.")
            else:
                log.exception("Job %s failed", job.id)
                self._finish(job, "failed", f"{type(exc).__name__}: {exc}")
            return
        job.result = result
        describe = getattr(job, "_describe", None)
        try:
            info = describe(result) if describe else (result if isinstance(result, dict) else {})
        except Exception as exc:  # noqa: BLE001
            info = {"describe_error": str(exc)}
        job.info = _jsonable(info) if isinstance(info, dict) else {}
        self._finish(job, "cancelled" if job.cancel_event.is_set() else "done",
                     "Stopped by the user; the result so far was kept." if job.cancel_event.is_set() else None)

    def _finish(self, job: Job, status: str, error: str | None) -> None:
        with self._lock:
            job.status, job.error, job.finished = status, error, time.time()
            for attr in ("_fn", "_describe"):  # free closures (they may hold tensors)
                job.__dict__.pop(attr, None)
        self._persist(job, force=True)
        job.done_event.set()

    # -- status files ----------------------------------------------------------------------------
    def _persist(self, job: Job, force: bool = False) -> None:
        if self.dir is None:
            return
        now = time.monotonic()
        with self._lock:
            if not force and now - self._written.get(job.id, 0.0) < self.write_every:
                return
            self._written[job.id] = now
            try:  # under the lock: a stale snapshot never overwrites a newer one
                write_status(self.dir / f"{job.id}.json", job.to_dict())
            except OSError as exc:  # a full disk must not kill the job
                log.warning("Could not write the status of job %s: %s", job.id, exc)

    def _read(self, path: Path) -> Job | None:
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            if not files.check_record(d):
                files.warn_bad(path, "checksum mismatch", "job status file")
                return None
            return Job.from_dict(d)
        except FileNotFoundError:
            return None  # pruned or replaced meanwhile
        except (OSError, ValueError, KeyError, TypeError) as exc:  # half-written by a crash: ignored, never trusted
            files.warn_bad(path, f"unreadable: {type(exc).__name__}", "job status file")
            return None

    def _recover(self) -> list[str]:
        """Mark jobs left 'queued'/'running' by a process that is gone as interrupted; prune old files."""
        if self.dir is None or not self.dir.exists():
            return []
        recovered, entries = [], []
        for path in self.dir.glob("*.json"):
            job = self._read(path)
            if job is None:
                continue
            entries.append((job.created, path, job))
            owner = job.owner or {}
            if job.active and owner.get("token") != PROCESS_TOKEN and not (
                    owner.get("pid") not in (None, os.getpid()) and pid_alive(int(owner["pid"]), owner.get("started"))):
                job.status, job.finished = "interrupted", time.time()
                job.error = (f"Interrupted: the process running it (pid {owner.get('pid')}) ended before it finished "
                             f"at stage '{job.stage}' step {job.step}/{job.total}. Run it again.")
                write_status(path, job.to_dict())
                recovered.append(job.id)
        files.clean_temps(self.dir, whole_folder=True)  # temp files of writers that were killed: never read, removed
        entries.sort(key=lambda t: t[0])
        for _, path, job in entries[: max(0, len(entries) - self.keep)]:
            if not job.active:
                path.unlink(missing_ok=True)
        return recovered
