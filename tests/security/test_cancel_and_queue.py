"""Why #7 and #8: cancel holds over the API (a queued job is removed, a running one stops at its next step whether
the caller cancels, calls Job.cancel() or disconnects, and the message counts what was saved), and polling never
takes a queue slot, so a full queue does not flood idle pages."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
from app_server_support import wait_for_status
from gradio_client.utils import Status

pytestmark = pytest.mark.timeout(300)
# Long enough that a job is still running whatever the machine's speed (it is always cancelled, so costs nothing).
LONG = {"width": 512, "height": 512, "num_inference_steps": 200, "batch_count": 8}
LONG_ARGS = [512, 512, 200, -1, -1, "Lens-Turbo", 8, 1, [], None]  # /generate's raw data after the two prompts


def saved_with(folder: Path, words: str) -> list[Path]:
    """PNGs saved anywhere under `folder` whose prompt starts with `words` (file names end with its words)."""
    return sorted(folder.rglob(f"*-{words}.png"))


def test_cancel_removes_waiting_jobs_and_stops_the_running_one(login_app, alice, bob):
    outputs = login_app.output_dir
    running = alice.submit(prompt="alice long", api_name="/generate", **LONG)
    wait_for_status(running, Status.PROCESSING)
    waiting = [bob.submit(prompt=f"bob waiting {i}", seed=i, api_name="/generate", **LONG) for i in range(2)]
    for job in waiting:
        wait_for_status(job, Status.IN_QUEUE)
    assert bob.predict(api_name="/cancel") == "Removed 2 waiting jobs from the queue."
    for job in waiting:
        with pytest.raises(Exception, match="Cancelled while waiting"):  # gradio_client raises its own types
            job.result(timeout=60)
    assert alice.predict(api_name="/cancel").startswith("Cancelling your running job")
    with pytest.raises(Exception, match="nothing was saved"):
        running.result(timeout=60)
    assert saved_with(outputs, "bob-waiting-0") == saved_with(outputs, "bob-waiting-1") == []


def test_job_cancel_and_a_disconnect_stop_a_running_job(login_app, alice, bob):
    outputs = login_app.output_dir
    job = alice.submit(prompt="cancelled by client", api_name="/generate", **LONG)
    wait_for_status(job, Status.PROCESSING)
    job.cancel()  # gradio_client: today this returned True and the job ran on and saved

    raw = login_app.raw("alice")
    event_id = raw.join("generate", ["dropped by client", "", *LONG_ARGS])
    with contextlib.closing(raw.messages(raw.session_hash)) as messages:
        for message in messages:
            if message.get("msg") == "progress" and message.get("event_id") == event_id:
                break  # the job is running: close the connection now
    raw.http.close()

    # The GPU is serialized: once a later job has finished, the two above have released it.
    files, _ = bob.predict(prompt="after them", api_name="/generate", width=64, height=64, num_inference_steps=2)
    assert files
    assert saved_with(outputs, "cancelled-by-client") == []  # Job.cancel()
    assert saved_with(outputs, "dropped-by-client") == []  # the connection closed


def test_the_cancel_message_counts_what_was_saved(login_app):
    raw = login_app.raw("alice")
    outputs = login_app.output_dir
    form = raw.dependency("generate_stream")
    components = {c["id"]: c for c in raw.config["components"]}
    values = {
        "Prompt": "counted batches",
        "Width": 256,
        "Height": 256,
        "Steps": 200,
        "Batch count": 4,
        "Seed": "Fixed",
        "Seed value": 50,
    }
    data = [
        values.get(components[i]["props"].get("label"), components[i]["props"].get("value"))
        if components[i]["type"] != "state"
        else None
        for i in form["inputs"]
    ]
    raw.call("_start_job", [None])
    event_id = raw.join("generate_stream", data)
    status, cancelled = None, False
    with contextlib.closing(raw.messages(raw.session_hash)) as messages:
        for message in messages:
            if message.get("event_id") != event_id:
                continue
            progress = message.get("msg") == "progress" and message["progress_data"][0]["index"]
            if not cancelled and progress and progress > 400:  # early in batch 3: batches 1 and 2 are saved
                raw.call("cancel", [None])
                cancelled = True
            if message.get("msg") == "process_completed":
                status = next(v for v in message["output"]["data"] if isinstance(v, str) and "Cancelled" in v)
                break
    saved = saved_with(outputs, "counted-batches")
    match = re.search(r"(\d) of 4 images were saved", status)
    assert match and int(match[1]) == len(saved) >= 2, status


def test_a_full_queue_still_answers_every_poll_and_says_how_many_jobs_are_ahead(space_app):
    """`--queue-size 2`: one job runs, two wait, a third is refused; the page's timers (status, queue line, the
    Recaption and Train polls) never queue, so they still answer, and the waiting visitor learns their place."""
    runner, waiter = space_app.client(), space_app.raw()
    running = runner.submit(prompt="space running", api_name="/generate", **LONG)
    wait_for_status(running, Status.PROCESSING)
    long_job = ["space waiting", "", *LONG_ARGS]
    waiting = [waiter.join("generate", long_job) for _ in range(2)]
    refused = space_app.raw().call("generate", long_job)
    assert not refused.success and "Queue is full" in refused.error
    for poll in ("lambda", "queue_status", "recaption_poll", "refresh", "train_status", "model_status"):
        outcome = waiter.call(poll, [None] * len(waiter.dependency(poll)["inputs"]))
        assert outcome.success, (poll, outcome)  # today: 503 "Queue is full" for every tick
    line = waiter.call("queue_status", []).data[0]
    assert line == "Your job is queued: **1 job ahead of you**."
    assert waiter.call("cancel", [None]).data[0] == "Removed 2 waiting jobs from the queue."
    errors = [outcome.error for outcome in waiter.follow_all(waiting)]
    assert errors == ["Cancelled while waiting for the GPU; nothing was saved."] * 2
    assert runner.predict(api_name="/cancel").startswith("Cancelling your running job")
    with pytest.raises(Exception, match="Cancelled"):
        running.result(timeout=60)
    assert waiter.call("queue_status", []).data[0] == ""
