"""The worker process's side: serve jobs for one hosted model over a `Channel`.

A worker is started by `worker_process.WorkerProcess` (the server's `ProcessJobRunner`, or
`remote='local', isolate=True`), through `python -m interlace.models.worker`: that entry point
sits in `models/` because loading a model by its path is `models/`' work, which this layer may
not import; it loads the model and calls `serve(...)` here with it.

The conversation, framed messages over the socketpair (`channel.py`; never pickle):

    parent                                    worker
    {"op": "init", policy, threads, ...}  ->
                                          <-  {"op": "ready", layers} + model description (JSON)
    {"op": "job"} + payload bytes         ->
                                          <-  {"op": "log", "line"}        (any number)
                                          <-  {"op": "local-start", "line"} + values
    {"op": "local-msg", "msg"} + bytes    ->  (a local block, `local_channel.py`: "msg" is
                                          <-  {"op": "local-reply"} + value    a read, done
    {"op": "local-msg", "msg"} + bytes    ->   or failed; a reply per read; any number of blocks)
                                          <-  {"op": "done"} + result bytes
                                              or {"op": "failed", "text", "category"}
    {"op": "batch", "sizes", "limits"}    ->  (a co-batch, `batch_channel.py`: several jobs'
      + payload 1 | payload 2 | ...            payloads; each decoded here, the valid ones run
                                               by `cobatch.run_batch`, one answer for all)
                                          <-  {"op": "batch-done", "recycle", "outcomes":
                                                [{"log_size", "size", "failed", "rows"}, ...]}
                                                + logs 1 | result 1 | logs 2 | result 2 | ...
                                              or {"op": "batch-failed", "text", "category"}
    {"op": "stop"} or the channel closes  ->  the worker exits

After a job (or a batch) that changed the model in a way it cannot put back, the answer
carries `"recycle": true` and the worker exits; the parent starts a fresh one from the files.

A batch sends no "log" messages: each job's printed lines come back in its outcome, because
`cobatch.run_batch` may run a job again alone after the shared attempt, and only the lines of
the attempt whose result counts may reach the user. Its CPU allowance is n jobs' (the parent's
wall clock likewise); each job's own guard still stops it at its own limit. A payload that does
not decode is that job's outcome ("invalid-request"), as for a single job; "batch-failed" (a
bug of ours, memory exhausted between jobs) ends the worker, and the parent runs each job
alone.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback
from typing import Any, Callable

from ..contract.model_meta import NotDescribable, describe_model
from ..contract.policy import Policy
from .batch_channel import OP_BATCH, OP_BATCH_DONE, OP_BATCH_FAILED, MalformedBatch, encode_outcomes, \
    limits_from_json, split_payloads
from .channel import Channel, ChannelClosed
from .cobatch import CATEGORY_INTERNAL, BatchLimits, JobOutcome, run_batch
from .confine import confine, reset_cpu_limit
from .errors import BadRequest, JobFailed
from .hosted import HostedModel
from .integrity import guard_for, needs_recycle
from .local_channel import ChannelPeer
from .receive import prepare_payload
from .run import run_prepared

__all__ = ["Loader", "serve", "worker_main"]

#: Builds the hosted model from the init message's `model` spec (given by the entry point).
Loader = Callable[[dict[str, Any]], HostedModel]


def worker_main(argv: list[str], load: Loader) -> int:
    """The entry point's body: `--fd N` names the inherited end of the socketpair."""
    fd = int(argv[argv.index("--fd") + 1])
    channel = Channel(socket.socket(fileno=fd))
    _die_with_parent()
    try:
        header, _ = channel.recv()
    except ChannelClosed:
        return 0
    try:
        return serve(channel, header, load)
    except ChannelClosed:
        return 0


def serve(channel: Channel, init: dict[str, Any], load: Loader) -> int:
    policy = Policy.model_validate(init["policy"])
    key = init["key"]
    threads = init.get("threads")
    try:
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        model = load(init["model"])
        # The fixed baseline (and pristine weights) every job is checked against, taken before
        # any job ran.
        guard_for(model, server=True)
        try:
            meta: Any = describe_model(model)
        except NotDescribable as exc:
            meta = {"not_describable": str(exc)}
        meta_bytes = json.dumps(meta).encode()
        active = confine(max_memory_bytes=policy.max_memory_bytes if init.get("memory_limit", True) else None,
                         cpu_seconds=policy.cpu_seconds, use_seccomp=init.get("seccomp", True))
    except BaseException as exc:  # noqa: BLE001 - the parent reports it and does not retry blindly
        channel.send({"op": "fatal", "text": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc()[-8000:]})
        return 1
    channel.send({"op": "ready", "layers": active, "pid": os.getpid()}, meta_bytes)
    models = {key: model}
    while True:
        header, payload = channel.recv()
        op = header.get("op")
        if op == "stop":
            return 0
        if op == OP_BATCH:
            try:
                payloads = split_payloads(header, payload)
            except MalformedBatch as exc:
                channel.send({"op": "fatal", "text": f"a malformed batch from the parent: {exc}"})
                return 1
            if not _run_batch(channel, payloads, limits_from_json(header.get("limits")), models, model, policy):
                return 0
            continue
        if op != "job":
            channel.send({"op": "fatal", "text": f"unknown message {op!r} from the parent"})
            return 1
        if not _run_job(channel, payload, models, model, policy):
            return 0


def _run_job(channel: Channel, payload: bytes, models: dict[str, Any], model: HostedModel, policy: Policy) -> bool:
    """Run one job and answer; False when the worker must exit (the model cannot be trusted)."""
    reset_cpu_limit(policy.cpu_seconds)

    def log(line: str) -> None:
        channel.send({"op": "log", "line": str(line)})

    try:
        # Checked again here although the parent checked it on receipt: this process decodes
        # the payload for itself and trusts nothing the parent did not send as bytes.
        prepared = prepare_payload(payload, policy, models)
        # The body's local blocks run on the client, through the parent (`local_channel.py`).
        result = run_prepared(prepared, model, policy, log, local=ChannelPeer(channel))
    except JobFailed as failed:
        # A MemoryError may leave the allocator fragmented or a cache half-filled: start afresh.
        recycle = failed.category in ("model-modified", "MemoryError") or needs_recycle(model)
        channel.send({"op": "failed", "text": failed.traceback_text, "category": failed.category,
                      "recycle": recycle})
        return not recycle
    except BadRequest as bad:
        channel.send({"op": "failed", "text": bad.message, "category": "invalid-request", "recycle": False})
        return True
    except MemoryError:
        channel.send({"op": "failed", "category": "memory", "recycle": True,
                      "text": f"MemoryError: the job used more than the server's memory limit of "
                              f"{policy.max_memory_bytes} bytes; use less memory (fewer saved values, "
                              "smaller batches)."})
        return False
    except Exception as exc:  # noqa: BLE001 - a bug of ours, or a limit the checks missed (RecursionError)
        # The job fails with its cause, and this worker is replaced: nothing that raised
        # half-way through a job is trusted to leave the process as it found it.
        channel.send({"op": "failed", "category": "internal-error", "recycle": True,
                      "text": f"{type(exc).__name__}: {exc}\n(the server could not run this job; the "
                              "worker that tried was replaced. If it persists, report it with the job id.)"})
        return False
    # What layer 4 could not put back (integrity.py: weights without a copy, a changed
    # tokenizer vocabulary, ...): the parent starts a fresh worker from the model's files.
    recycle = needs_recycle(model)
    channel.send({"op": "done", "recycle": recycle}, result)
    return not recycle


def _run_batch(channel: Channel, payloads: list[bytes], limits: BatchLimits, models: dict[str, Any], model: HostedModel,
               policy: Policy) -> bool:
    """Run one co-batch and answer; False when the worker must exit (as `_run_job`)."""
    reset_cpu_limit(policy.cpu_seconds * max(1, len(payloads)))
    try:
        outcomes: list[JobOutcome | None] = []
        prepared = []
        for payload in payloads:
            try:
                # Decoded here, as a single job's payload is: trust only the bytes.
                prepared.append(prepare_payload(payload, policy, models))
                outcomes.append(None)
            except BadRequest as bad:
                outcomes.append(JobOutcome(failure=JobFailed(bad.message, "invalid-request")))
        ran = run_batch(prepared, model, policy, limits) if prepared else []
        if len(ran) != len(prepared):
            raise RuntimeError(f"run_batch gave {len(ran)} outcomes for {len(prepared)} jobs")
        given = iter(ran)
        done = [outcome if outcome is not None else next(given) for outcome in outcomes]
        entries, body = encode_outcomes(done)
        # As after a single job: a MemoryError or a model the guard could not put back.
        recycle = needs_recycle(model) or any(
            o.failure is not None and o.failure.category in ("model-modified", "MemoryError", CATEGORY_INTERNAL)
            for o in done)
    except Exception as exc:  # noqa: BLE001 - MemoryError, a bug of ours: the parent runs each job alone
        channel.send({"op": OP_BATCH_FAILED, "category": "memory" if isinstance(exc, MemoryError) else "internal-error",
                      "text": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-4000:]}"})
        return False
    channel.send({"op": OP_BATCH_DONE, "outcomes": entries, "recycle": recycle}, body)
    return not recycle


def _die_with_parent() -> None:
    """Ask the kernel to kill this process when its parent dies (Linux), so a worker never
    outlives the server that started it, whatever killed the server."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
