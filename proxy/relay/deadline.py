"""When an exchange with DeepSeek must end (first byte, total, a departed client's grace)."""

from __future__ import annotations

import asyncio


class Deadline:
    """When the exchange must end: at `when`, the task running it is cancelled, and
    `took_effect` then tells that cancellation from any other.

    What ``asyncio.timeout_at`` does for this one use, minus its state machine and its
    lookups of the running loop and task: it was a fifth of the exchange's own instructions
    (measured with callgrind; one timer handle is all it needs). Same rule for telling
    cancellations apart: the deadline's is the one when no other cancel request is pending
    (`asyncio.Task.uncancel`).
    """

    __slots__ = ("_cancelling", "_handle", "_loop", "_task", "_uncancelled", "expired", "when")

    def __init__(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        task = asyncio.current_task(loop)
        assert task is not None, "a deadline runs inside a task"
        self._loop = loop
        self._task = task
        self._cancelling = task.cancelling()
        self.expired = False
        self._uncancelled = False
        self.when = when
        self._handle: asyncio.TimerHandle | None = loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self.expired = True
        self._handle = None
        self._task.cancel()

    def reschedule(self, when: float) -> None:
        """Move the deadline (a no-op once it has expired: the cancellation is on its way)."""
        if self.expired:
            return
        if self._handle is not None:
            self._handle.cancel()
        self.when = when
        self._handle = self._loop.call_at(when, self._expire)

    def took_effect(self) -> bool:
        """Whether the CancelledError being handled is this deadline's."""
        if not self.expired or self._uncancelled:
            return False
        self._uncancelled = True
        return self._task.uncancel() <= self._cancelling

    def close(self) -> None:
        """The exchange is over: drop the timer, and withdraw the deadline's cancel request
        if it fired but its CancelledError never surfaced here."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self.expired and not self._uncancelled:
            self._uncancelled = True
            self._task.uncancel()
