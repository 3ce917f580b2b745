"""The body of one Ray replica actor: a `WorkerSupervisor` for one model, driven by method calls.

`interlace serve --ray` (`server/ray_runner.py`) runs each hosted model as N Ray actors; each
actor is a `ReplicaBody` wrapped by `ray.remote` there. The body holds the very
`WorkerSupervisor` the embedded server holds (`process.py`): the same sandboxed worker process
(bubblewrap, seccomp, limits, integrity checks, co-batching, local blocks), one per replica, so
Ray adds placement and nothing to what a job may do. Nothing here imports Ray at module level:
the class is plain Python (the runner wraps it), and only `where()` asks Ray for its node.

One job is one streaming call (`run`, a generator the runner calls with
`num_returns="streaming"`): it yields events while the job runs, as plain tuples (nothing
pickled but bytes, strings and numbers):

    ("token", token)                  the first event: the job's name for `local_answer`
    ("log", line)                     a line the job printed
    ("local-start", line, values)     the job reached `with interlace.local():` at `line`
    ("local-reply", value)            the job answers the client's read in the open block
    ("done", result_bytes)            the last event: the job's result
    ("failed", text, category)        the last event: the job failed (`JobFailed`)

After a `local-*` event the job waits until the API answers with `local_answer(token, header,
body)` (the client's message, `contract.local_block.message_to_wire`), another method call on
the same actor: the actor runs several calls at once (a threaded actor), so that one is served
while `run` waits. A job whose answer never comes fails after the policy's local-block limits
(plus a margin), never hangs.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from typing import Any, Iterator, Sequence

from concurrent.futures import ThreadPoolExecutor

from ..contract.local_block import CATEGORY_CLIENT_GONE, BlockFailed, ClientMessage, message_from_wire
from ..contract.policy import Policy
from .cobatch import BatchLimits
from .errors import JobFailed
from .process import WorkerSpec, WorkerSupervisor

__all__ = ["EVENT_DONE", "EVENT_FAILED", "EVENT_LOCAL_REPLY", "EVENT_LOCAL_START", "EVENT_LOG", "EVENT_TOKEN",
           "MSG_NO_ANSWER", "ReplicaBody", "WireOutcome"]

EVENT_TOKEN = "token"
EVENT_LOG = "log"
EVENT_LOCAL_START = "local-start"
EVENT_LOCAL_REPLY = "local-reply"
EVENT_DONE = "done"
EVENT_FAILED = "failed"

#: Seconds added to the policy's local-block limits before a replica stops waiting for the
#: API's answer (the API's own peer enforces the limits; this only ends a wait whose API is gone).
_ANSWER_MARGIN_S = 30.0

MSG_NO_ANSWER = (
    "the local block at line {line} got no answer from the server's API process within {seconds:g} s "
    "(the API process that ran the job stopped or lost its connection to the Ray cluster), so the "
    "job was stopped. Submit it again; if it keeps happening, ask the server's operator to check "
    "the API replicas (`interlace serve --ray ...`)."
)

#: One co-batched job's outcome, as plain values: (result, logs, failure text, failure category, rows).
WireOutcome = tuple[bytes | None, list[str], str | None, str | None, int]


class _ActorPeer:
    """The job's `LocalPeer` inside the actor: each hop is an event the API reads from the
    job's stream, and an answer it sends back with `ReplicaBody.local_answer`."""

    def __init__(self, events: "queue.Queue[tuple[Any, ...] | None]", policy: Policy) -> None:
        self._events = events
        self.answers: "queue.Queue[tuple[dict[str, Any], bytes]]" = queue.Queue()
        self._wait_s = policy.local_block_seconds + policy.local_grace_seconds + _ANSWER_MARGIN_S
        self._line = 0

    def start(self, line: int, values: bytes) -> ClientMessage:
        self._line = line
        self._events.put((EVENT_LOCAL_START, int(line), values))
        return self._answer()

    def reply(self, value: bytes) -> ClientMessage:
        self._events.put((EVENT_LOCAL_REPLY, value))
        return self._answer()

    def _answer(self) -> ClientMessage:
        try:
            header, body = self.answers.get(timeout=self._wait_s)
        except queue.Empty:
            return BlockFailed(MSG_NO_ANSWER.format(line=self._line, seconds=self._wait_s), CATEGORY_CLIENT_GONE)
        return message_from_wire(header, body)


class ReplicaBody:
    """One replica of one model (the actor's state): its worker supervisor and its jobs' local
    block peers. Several calls run at once (a threaded actor); the supervisor runs one job or
    co-batch at a time, as in the embedded server."""

    def __init__(self, spec: WorkerSpec, policy: Policy, sandbox: bool | None = None) -> None:
        self.spec = spec
        self.policy = policy
        self.supervisor = WorkerSupervisor(spec, policy, sandbox=sandbox)
        # Every call into the supervisor runs on this one long-lived thread: a worker process
        # is told to die with the thread that started it (bubblewrap's --die-with-parent is
        # PR_SET_PDEATHSIG), and a worker replaced during a job is started by that job's call.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="interlace-replica")
        self._peers: dict[str, _ActorPeer] = {}
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()
        self.jobs = 0

    def where(self) -> dict[str, Any]:
        """The actor's node, id and process id (answers at once: the runner's check that Ray
        placed it; the operator's way to find it)."""
        import ray

        context = ray.get_runtime_context()
        return {"node": context.get_node_id(), "actor": context.get_actor_id(), "pid": os.getpid()}

    def start(self) -> dict[str, Any]:
        """Start the worker process (loads the model); its description and sandbox layers.
        Raises `WorkerStartError` with the reason when the model cannot load."""
        self._executor.submit(self.supervisor.start).result()
        return {"meta": self.supervisor.meta, "layers": dict(self.supervisor.layers)}

    def run(self, payload: bytes) -> Iterator[tuple[Any, ...]]:
        """One job (a streaming call): its events, the last one `done` or `failed`."""
        events: "queue.Queue[tuple[Any, ...] | None]" = queue.Queue()
        peer = _ActorPeer(events, self.policy)
        token = f"{threading.get_ident()}-{next(self._tokens)}"
        with self._lock:
            self._peers[token] = peer
            self.jobs += 1
        yield (EVENT_TOKEN, token)

        def work() -> None:
            try:
                result = self.supervisor.run(payload, lambda line: events.put((EVENT_LOG, line)), local=peer)
                events.put((EVENT_DONE, result))
            except JobFailed as failed:
                events.put((EVENT_FAILED, failed.traceback_text, failed.category))
            except BaseException as error:  # noqa: BLE001 - reported as the job's failure, never lost
                events.put((EVENT_FAILED, f"{type(error).__name__}: {error}", "internal"))

        # The supervisor runs on the executor's thread so that this generator hands each
        # event to Ray as it comes (a print reaches the client while the job still runs).
        self._executor.submit(work)
        try:
            while True:
                event = events.get()
                yield event
                if event[0] in (EVENT_DONE, EVENT_FAILED):
                    return
        finally:
            with self._lock:
                self._peers.pop(token, None)

    def local_answer(self, token: str, header: dict[str, Any], body: bytes) -> bool:
        """The client's message for the open local block of job `token`; False if that job
        is no longer running here."""
        with self._lock:
            peer = self._peers.get(token)
        if peer is None:
            return False
        peer.answers.put((header, body))
        return True

    def run_batch(self, payloads: Sequence[bytes], limits: BatchLimits) -> list[WireOutcome]:
        """A co-batch (`WorkerSupervisor.run_batch`); one plain outcome per job, in order."""
        with self._lock:
            self.jobs += len(payloads)
        outcomes = self._executor.submit(self.supervisor.run_batch, list(payloads), limits).result()
        return [(o.result, list(o.logs), None if o.failure is None else o.failure.traceback_text,
                 None if o.failure is None else o.failure.category, o.rows) for o in outcomes]

    def stats(self) -> dict[str, Any]:
        """What the status shows of this replica: jobs it ran, worker restarts, whether its
        worker process is alive."""
        worker = self.supervisor.worker
        return {"jobs": self.jobs, "restarts": self.supervisor.restarts,
                "worker_alive": worker is not None and worker.alive}

    def close(self) -> None:
        self._executor.submit(self.supervisor.close).result()
