"""The one job layer (`training.jobs`) with a stand-in job: own process group, stop = SIGTERM then SIGKILL after the
grace period (the whole group), resume, following a job from another `Job` object, and no zombies. Every wait is on
an event (a progress line, an exit), never on a clock."""

from __future__ import annotations

import signal
import time

import psutil
import pytest

from training.jobs import Job, job_state

pytestmark = pytest.mark.timeout(120)
FIXTURE = "tests.training.job_fixture"
FINAL = {"done": "done", "stopped": "stopped"}


def _wait_until(condition, what: str, limit: float = 90) -> None:
    deadline = time.monotonic() + limit  # a generous cap so a broken job fails the test instead of hanging it
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


def _start(tmp_path, mode: str, **kwargs) -> Job:
    progress = tmp_path / "progress.jsonl"
    job = Job.start(FIXTURE, [str(progress), mode], tmp_path, progress, **kwargs)
    _wait_until(lambda: any(e["event"] == "start" for e in job.events()), "the job started")
    return job


def _dead(pid: int) -> bool:
    """Ended (a zombie counts: it no longer runs; whoever is its parent now has to collect it)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _reaped(pid: int) -> bool:
    """Ended and collected by its parent: no zombie left behind."""
    return not psutil.pid_exists(pid)


def test_stop_asks_first_then_kills_the_whole_group(tmp_path):
    job = _start(tmp_path, "stubborn")
    grandchild = job.events()[0]["grandchild"]
    assert psutil.Process(job.pid).pid == job.pid and job.running()
    assert job.stop(grace_seconds=0.5)  # returns at once; the kill follows the grace period
    assert job.wait(timeout=60) == -signal.SIGKILL
    _wait_until(lambda: _dead(grandchild), "the grandchild in the job's process group was killed")
    assert job_state(Job.attach(tmp_path), FINAL) == "killed" and not job.stop()


def test_graceful_stop_records_stopped_and_another_job_object_follows_it(tmp_path):
    job = _start(tmp_path, "graceful")
    follower = Job.attach(tmp_path)  # e.g. the next request of the Train tab, or a restarted app
    assert follower.pid == job.pid and follower.running() and job_state(follower, FINAL) == "running"
    assert follower.stop(grace_seconds=60)
    assert job_state(Job.attach(tmp_path), FINAL) in ("stopping", "stopped")
    assert job.wait(timeout=60) == 130
    assert job_state(Job.attach(tmp_path), FINAL) == "stopped"


def test_a_finished_job_is_reaped_and_resume_runs_it_again(tmp_path):
    job = _start(tmp_path, "quick", resume_arguments=["--again"])
    # The reaper thread collects the exit status by itself and records it: no zombie, no one has to poll.
    _wait_until(lambda: Job.attach(tmp_path).exit_code_recorded == 0, "the exit code was recorded")
    assert _reaped(job.pid) and not job.running() and job.exit_code() == 0
    assert job_state(Job.attach(tmp_path), FINAL) == "done"
    Job.attach(tmp_path).resume()
    _wait_until(
        lambda: [e.get("arguments") for e in job.events() if e["event"] == "start"] == [[], ["--again"]], "resumed"
    )
    with pytest.raises(ValueError, match="already running"):
        running = _start(tmp_path / "other", "graceful")
        running.resume()
    running.stop(grace_seconds=60)
    running.wait(timeout=60)
