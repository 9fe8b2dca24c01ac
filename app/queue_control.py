"""What the app needs from Gradio's queue beyond its public API, in one place.

Gradio offers no public call to drop one session's waiting jobs, to learn that the client of a running job went
away, or to count the jobs ahead of someone. These few functions read the queue's internals (`Blocks._queue`, its
events and their `alive` flag, `LocalContext.event_id`); if a Gradio release moves them, the functions degrade to
"nothing waiting / still wanted" and `tests/security` fails loudly rather than the app breaking.
"""

from __future__ import annotations

import logging

import gradio as gr

logger = logging.getLogger(__name__)


class QueueControl:
    """Attached to the app's `gr.Blocks` once it exists (`attach`)."""

    def __init__(self) -> None:
        self.blocks: gr.Blocks | None = None

    def attach(self, blocks: gr.Blocks) -> None:
        self.blocks = blocks

    def _queue(self):
        return getattr(self.blocks, "_queue", None)

    def _waiting(self, concurrency_id: str) -> list:
        queue = self._queue()
        event_queue = getattr(queue, "event_queue_per_concurrency_id", {}).get(concurrency_id)
        return list(getattr(event_queue, "queue", []))

    def _running(self, concurrency_id: str) -> list:
        queue = self._queue()
        jobs = getattr(queue, "active_jobs", None) or []
        return [
            event for job in jobs if job for event in job if getattr(event, "concurrency_id", None) == concurrency_id
        ]

    async def drop_waiting(self, session: str | None, concurrency_id: str, message: str) -> int:
        """Remove `session`'s jobs still waiting in `concurrency_id` and end each with `message` as its error;
        return how many there were. Runs on the event loop (the queue's lock is an asyncio lock)."""
        from gradio.server_messages import ProcessCompletedMessage

        queue = self._queue()
        if queue is None or not session:
            return 0
        async with queue.delete_lock:
            mine = [event for event in self._waiting(concurrency_id) if event.session_hash == session]
            event_queue = queue.event_queue_per_concurrency_id[concurrency_id]
            for event in mine:
                event_queue.queue.remove(event)
                queue.event_ids_to_events.pop(event._id, None)
        for event in mine:
            output = {"error": message, "title": "Cancelled", "visible": True, "duration": 10}
            queue.send_message(event, ProcessCompletedMessage(output=output, success=False, title="Cancelled"))
        if mine:
            logger.info("Dropped %d waiting job(s) of one session from the %s queue.", len(mine), concurrency_id)
        return len(mine)

    @staticmethod
    def current_event_id() -> str | None:
        """The id of the queued event whose handler is running in this context (None outside one)."""
        from gradio.context import LocalContext

        return LocalContext.event_id.get(None)

    def still_wanted(self, event_id: str | None) -> bool:
        """False once the client of the running event `event_id` has disconnected (Gradio marks it not alive)."""
        queue = self._queue()
        if queue is None or event_id is None:
            return True
        for job in getattr(queue, "active_jobs", None) or []:
            for event in job or []:
                if event._id == event_id:
                    return bool(event.alive)
        return True

    def line_for(self, session: str | None, concurrency_id: str) -> str:
        """One line about the GPU queue for this session: "2 jobs ahead of you", "GPU busy: 3 jobs waiting", or ""
        when nothing waits."""
        waiting, running = self._waiting(concurrency_id), self._running(concurrency_id)
        positions = [index for index, event in enumerate(waiting) if event.session_hash == session]
        if positions:
            ahead = positions[0] + len(running)
            return f"Your job is queued: **{ahead} job{'s' if ahead != 1 else ''} ahead of you**."
        if any(event.session_hash == session for event in running):
            return f"Your job is running; {len(waiting)} waiting after it." if waiting else ""
        if waiting:
            return f"GPU busy: {len(running)} running, {len(waiting)} waiting."
        return ""
