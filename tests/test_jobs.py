"""The background job runner: queueing with visible positions, progress and logs, cancel, failures,
status files that survive the process, and interrupted jobs after a crash."""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
from conftest import wait_until

from neurontune.studio.jobs import Job, JobRunner, write_status


def _blocker(release: threading.Event, steps: int = 3):
    """A job that logs `steps` losses, then waits for `release` (or its cancel flag)."""
    def fn(reporter):
        for i in range(1, steps + 1):
            reporter.progress(i, steps, "train")
            reporter.step({"step": i, "loss": 1.0 / i})
        while not release.wait(0.01):
            if reporter.cancelled:
                return {"stopped": "cancelled", "steps": steps}
        return {"path": "runs/x", "steps": steps}
    return fn


def _until(cond, timeout=5.0):
    return wait_until(cond, timeout, every=0.005)


def test_heavy_jobs_queue_with_positions_and_finish(tmp_path):
    runner = JobRunner(tmp_path)
    release = threading.Event()
    first = runner.submit("attribution", _blocker(release))
    second = runner.submit("train", lambda r: {"n": 2})
    third = runner.submit("evaluate", lambda r: {"n": 3})
    assert _until(lambda: first.status == "running")
    assert runner.position(first) is None
    assert (runner.position(second), runner.position(third)) == (1, 2)
    status = runner.status(third)
    assert status["position"] == 2 and status["running_now"] == "attribution"
    assert _until(lambda: first.step == 3 and len(first.log) == 3)
    assert [e["loss"] for e in first.log] == [1.0, 0.5, 1.0 / 3] and first.stage == "train" and first.total == 3
    assert second.status == "queued"  # one heavy worker: nothing overtakes
    release.set()
    assert third.wait(5)
    assert [j.status for j in (first, second, third)] == ["done"] * 3
    assert first.result == {"path": "runs/x", "steps": 3} and first.info == first.result
    assert second.started >= first.finished and third.started >= second.finished  # ran in order
    on_disk = json.loads((tmp_path / "jobs" / f"{first.id}.json").read_text())
    assert on_disk["status"] == "done" and on_disk["info"]["path"] == "runs/x" and len(on_disk["log"]) == 3


def test_light_jobs_do_not_wait_behind_heavy_ones(tmp_path):
    runner = JobRunner(tmp_path)
    release = threading.Event()
    heavy = runner.submit("train", _blocker(release))
    light = runner.submit("load", lambda r: {"ok": True}, heavy=False)
    assert light.wait(5) and light.status == "done"
    assert heavy.active
    release.set()
    assert heavy.wait(5)


def test_cancel_running_and_queued(tmp_path):
    runner = JobRunner(tmp_path)
    never = threading.Event()
    running = runner.submit("train", _blocker(never))
    queued = runner.submit("evaluate", lambda r: pytest.fail("a cancelled queued job must not run"))
    assert _until(lambda: running.status == "running")
    assert runner.cancel(queued.id)
    assert queued.status == "cancelled" and queued.wait(0) and runner.position(queued) is None
    assert runner.cancel(running.id)
    assert running.wait(5)
    assert running.status == "cancelled"
    assert running.result == {"stopped": "cancelled", "steps": 3}  # what it computed so far is kept
    assert not runner.cancel(running.id)  # already finished
    # a job that raises after its cancel flag is set counts as cancelled, not failed
    def raise_when_cancelled(reporter):
        reporter.cancel.wait(5)
        raise RuntimeError("Attribution cancelled.")
    raiser = runner.submit("attribution", raise_when_cancelled)
    assert _until(lambda: raiser.status == "running")
    raiser.cancel()
    assert raiser.wait(5) and raiser.status == "cancelled"


def test_failure_is_reported_and_worker_survives(tmp_path):
    runner = JobRunner(tmp_path)

    def boom(reporter):
        reporter.progress(1, 4, "attribute")
        raise ValueError("k_safety must be a whole number")
    bad = runner.submit("attribution", boom)
    good = runner.submit("train", lambda r: {"ok": 1})
    assert good.wait(5)
    assert bad.status == "failed" and "ValueError: k_safety must be a whole number" in bad.error
    assert good.status == "done"


def test_same_key_shares_one_active_job(tmp_path):
    runner = JobRunner(tmp_path)
    release = threading.Event()
    a = runner.submit("attribution", _blocker(release), key="fp:abc")
    b = runner.submit("attribution", _blocker(release), key="fp:abc")
    c = runner.submit("attribution", _blocker(release), key="fp:other")
    assert a is b and c is not a
    release.set()
    assert c.wait(5)
    d = runner.submit("attribution", lambda r: {"again": True}, key="fp:abc")  # finished: a new run
    assert d is not a and d.wait(5)
    assert runner.latest("attribution", key="fp:abc").id == d.id


def test_log_is_bounded(tmp_path):
    runner = JobRunner(tmp_path, max_log=10)

    def chatty(reporter):
        for i in range(50):
            reporter.step({"step": i, "loss": float(i)})
    job = runner.submit("train", chatty)
    assert job.wait(5)
    assert len(job.log) == 10 and job.log[-1]["step"] == 49 and job.step == 49


def test_second_runner_sees_finished_jobs(tmp_path):
    """A reopened page or a second process reads the status files of finished jobs."""
    first = JobRunner(tmp_path)
    job = first.submit("train", lambda r: (r.step({"step": 1, "loss": 0.25}), {"run_dir": "runs/a"})[1], key="k")
    assert job.wait(5)
    other = JobRunner(tmp_path)
    seen = other.get(job.id)
    assert seen is not None and seen.status == "done" and seen.info == {"run_dir": "runs/a"}
    assert list(seen.log) == [{"step": 1, "loss": 0.25}] and seen.wait(0)
    assert other.latest("train", key="k").id == job.id
    assert [j.id for j in other.jobs("train")] == [job.id]


def test_running_job_of_dead_process_shows_interrupted(tmp_path):
    """Kill a process in the middle of a job: the next runner marks it interrupted, keeps live ones."""
    script = f"""
import sys, time
sys.path.insert(0, {str(__import__('pathlib').Path(__file__).resolve().parent.parent)!r})
from neurontune.studio.jobs import JobRunner
r = JobRunner({str(tmp_path)!r}, write_every=0)
def fn(reporter):
    reporter.progress(2, 10, "attribute")
    print("started", flush=True)
    time.sleep(60)
j = r.submit("attribution", fn)
time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        files = list((tmp_path / "jobs").glob("*.json"))
        assert _until(lambda: json.loads(files[0].read_text())["step"] == 2)
        # while the process lives, its job stays running for everyone else
        assert JobRunner(tmp_path).recovered == []
    finally:
        proc.kill()
        proc.wait()
    runner = JobRunner(tmp_path)
    assert len(runner.recovered) == 1
    job = runner.get(runner.recovered[0])
    assert job.status == "interrupted" and "step 2/10" in job.error and job.stage == "attribute"
    assert json.loads(files[0].read_text())["status"] == "interrupted"
    # a file of this very pid but from an earlier process (pid reuse in a container) is interrupted too
    stale = Job("train-stale", "train", status="running")
    stale.owner = {"pid": __import__("os").getpid(), "token": "earlier", "started": None}
    write_status(tmp_path / "jobs" / "train-stale.json", stale.to_dict())
    (tmp_path / "jobs" / "broken.json").write_text("{not json")  # a half-written file is ignored
    again = JobRunner(tmp_path)
    assert again.recovered == ["train-stale"] and again.get("train-stale").status == "interrupted"


def test_old_status_files_are_pruned(tmp_path):
    runner = JobRunner(tmp_path)
    for i in range(6):
        assert runner.submit("train", lambda r: {}).wait(5)
    assert len(list((tmp_path / "jobs").glob("*.json"))) == 6
    JobRunner(tmp_path, keep=3)
    assert len(list((tmp_path / "jobs").glob("*.json"))) == 3


def test_shutdown_cancels(tmp_path):
    runner = JobRunner(None)  # no cache dir: in memory only
    never = threading.Event()
    job = runner.submit("train", _blocker(never))
    assert _until(lambda: job.status == "running")
    runner.shutdown(wait=5)
    assert job.status == "cancelled"
    with pytest.raises(RuntimeError):
        runner.submit("train", lambda r: None)
