"""Status fan-out: delivers job events to the WebSocket connections watching each job.

Events are published from worker threads and from request handlers; delivery always happens
on the event loop, so waiters wake on an asyncio queue instead of polling the database.
Delivery is best effort by design: every stored event is also in SQLite, and a subscriber
that falls behind (a slow client and a job printing fast) is told it lagged and catches up
from the database, so no memory grows without bound and nothing is lost.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict

from .store import Event

__all__ = ["EventHub", "Subscription", "SUBSCRIBER_BUFFER"]

SUBSCRIBER_BUFFER = 1000


class Subscription:
    def __init__(self, job_id: str, maxsize: int = SUBSCRIBER_BUFFER, *, serves_local: bool = False) -> None:
        self.job_id = job_id
        # The watcher said it runs the job's local blocks (`?local=1`): while it is here, a job
        # waiting for one keeps waiting (`local_exchange.py`).
        self.serves_local = serves_local
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self.lagged = False

    def _offer(self, event: Event) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.lagged = True

    async def get(self) -> Event | None:
        """The next event, or None once the buffer overflowed: the caller should re-read
        stored events from the database and then continue (see `take_lag`)."""
        if self.lagged:
            return None
        event = await self.queue.get()
        return event

    def take_lag(self) -> None:
        """Forget buffered events after a catch-up from the database."""
        self.lagged = False
        while not self.queue.empty():
            self.queue.get_nowait()


class EventHub:
    def __init__(self) -> None:
        self._subs: dict[str, set[Subscription]] = defaultdict(set)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def unbind(self) -> None:
        self._loop = None
        self._loop_thread = None

    def subscribe(self, job_id: str, *, serves_local: bool = False) -> Subscription:
        sub = Subscription(job_id, serves_local=serves_local)
        self._subs[job_id].add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.job_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.job_id]

    def has_subscribers(self, job_id: str) -> bool:
        # Read from worker threads without a lock: a stale answer only costs one skipped or
        # one extra transient queue-position message.
        return job_id in self._subs

    def has_local_watchers(self, job_id: str) -> bool:
        """Whether a watcher that runs the job's local blocks follows it now (any thread)."""
        return any(sub.serves_local for sub in tuple(self._subs.get(job_id, ())))

    def publish(self, event: Event) -> None:
        """Deliver `event`; callable from any thread. Call only after the event is committed."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if threading.get_ident() == self._loop_thread:
            self._deliver(event)
        else:
            try:
                loop.call_soon_threadsafe(self._deliver, event)
            except RuntimeError:  # loop closed between the check and the call (shutdown)
                pass

    def _deliver(self, event: Event) -> None:
        for sub in tuple(self._subs.get(event.job_id, ())):
            sub._offer(event)
