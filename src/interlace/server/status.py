"""The server's state as one API key sees it (`GET /v1/status`, the status page's data).

One JSON object: the server and protocol versions, each hosted model with its state and queue,
the key's user's recent jobs with their timelines (stored state events; LOG lines are only
counted), the served policy and the limits. Only the user's own jobs are named: a queue is a
count, never another user's job id. Built from what the service already holds (the worker
pool's queues, the job store, the runner's supervisors), so asking costs a few reads and no
lock a job holds for long.
"""

from __future__ import annotations

import time
from typing import Any, Final

from .._version import PROTOCOL_VERSION, __version__
from .auth import User
from .service import JobService

__all__ = ["MAX_RECENT_JOBS", "MODEL_STATES", "RECENT_JOBS", "cobatch_state", "model_states", "server_status"]

#: Jobs listed by default, newest first (`?limit=` asks for up to MAX_RECENT_JOBS).
RECENT_JOBS: Final = 20
MAX_RECENT_JOBS: Final = 100

#: What a hosted model's `state` can be, and what each means (the page shows the text).
MODEL_STATES: Final = {
    "ready": "loaded; takes jobs",
    "loading": "a fresh worker process is loading the model for the next job",
    "stopped": "no worker process now (the last one was replaced after a job); the next job starts one",
    "failed": "its worker process exited; the next job starts a fresh one",
    # `interlace serve --ray` (the runner's `model_states`, `ray_replicas.py`):
    "hot": "loaded in its Ray replicas; takes jobs",
    "cold": "not loaded (never used, or stopped for a more recently used model); the next job loads it",
}
# A Ray model loading reads as MODEL_STATES["loading"] too: its replicas are starting.

# The policy's limits that apply to each job (the rest of the policy says what code may do).
_JOB_LIMITS: Final = ("max_upload_bytes", "max_result_bytes", "max_source_bytes", "timeout_seconds", "cpu_seconds",
                      "max_memory_bytes", "max_log_bytes", "local_block_seconds", "local_grace_seconds")


def server_status(service: JobService, user: User, *, limit: int = RECENT_JOBS) -> dict[str, Any]:
    """Everything `GET /v1/status` answers to `user` (see docs/http-api.md for the fields)."""
    records = service.store.list_jobs(user.name, limit=max(1, min(int(limit), MAX_RECENT_JOBS)))
    timelines = service.store.timelines([record.id for record in records])
    jobs = []
    for record in records:
        job = service.status_json(record)
        job["log_lines"] = record.log_count
        job["events"] = [event.to_json() for event in timelines[record.id]]
        jobs.append(job)
    limits = service.limits
    return {
        "server": "interlace",
        "version": __version__,
        "protocol_version": PROTOCOL_VERSION,
        "time": time.time(),
        "user": user.name,
        "key_id": user.key_id,
        "models": model_states(service),
        "jobs": jobs,
        "policy": service.runner.policy(),
        "limits": {
            # Counted per API key (not per user name), as the service enforces them.
            "per_key": {
                "max_queued_per_key": limits.max_queued_per_key,
                "in_flight": service.store.count_in_flight(user.key_id),
                "requests_per_minute": limits.requests_per_minute,
            },
            "per_job": {name: getattr(limits, name) for name in _JOB_LIMITS},
            "result_ttl": service.settings.result_ttl,
        },
        "cobatch": cobatch_state(service),
    }


def cobatch_state(service: JobService) -> dict[str, Any]:
    """Co-batching as this server does it: `enabled` (on, and the runner batches) and the
    limits of one shared forward (`interlace serve --batch-rows/--batch-tokens/--batch-wait-ms`)."""
    limits = service.settings.batch_limits
    return {"enabled": service.batch_limits is not None, "max_rows": limits.max_rows,
            "max_tokens": limits.max_tokens, "wait_ms": service.settings.batch_wait_ms}


def model_states(service: JobService) -> list[dict[str, Any]]:
    """Each hosted model: its state (a key of MODEL_STATES), jobs waiting, whether one runs;
    with Ray, its `replicas` (actor id and name, node, jobs in flight, jobs run)."""
    # A ProcessJobRunner keeps one WorkerSupervisor a model; other runners (in-process
    # models, the test fake) loaded theirs before the server started, so they are ready.
    supervisors = getattr(service.runner, "supervisors", None) or {}
    # A runner with replicas (`--ray`) says where each model is itself (`types.py`).
    states_of = getattr(service.runner, "model_states", None)
    placed: dict[str, dict[str, Any]] = states_of() if callable(states_of) else {}
    found = []
    for key in service.model_keys:
        worker = service.pool.workers[key]
        running = worker.current is not None
        supervisor = supervisors.get(key)
        state = "ready" if supervisor is None else _process_state(supervisor, running)
        where = placed.get(key)
        if where is not None:
            state = where["state"]
        found.append({
            "key": key,
            "state": state,
            "detail": MODEL_STATES[state],
            "queue_length": len(worker),  # waiting, not counting the one running
            "running": running,
            "running_jobs": len(worker.running),  # more than 1: a co-batched forward
            "isolation": "ray" if where is not None else "process" if supervisor is not None else "in-process",
            "restarts": getattr(supervisor, "restarts", 0),
        })
        if where is not None:
            found[-1]["replicas"] = where.get("replicas", [])
    return found


def _process_state(supervisor: Any, running: bool) -> str:
    # Read without the supervisor's lock (a job holds it while it runs): a stale answer is
    # one refresh out of date, never wrong for long.
    process = supervisor.worker
    if process is not None and process.alive:
        return "ready"
    if running:  # a job is being handed to a worker that is still starting
        return "loading"
    return "stopped" if process is None else "failed"
