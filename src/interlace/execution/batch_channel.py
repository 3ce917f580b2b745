"""A co-batch across the worker process's channel: the two messages, both sides' codec.

The parent (`worker_process.WorkerProcess.run_batch`) sends several jobs' payloads in one
message; the worker (`worker.py`) decodes each payload itself, runs the valid ones through
`cobatch.run_batch` and answers one message with every job's outcome:

    parent                                            worker
    {"op": "batch", "sizes": [n1, ...], "limits"}  ->
      + payload 1 | payload 2 | ...
                                                   <-  {"op": "batch-done", "recycle", "outcomes":
                                                         [{"log_size", "size", "failed", "rows"}, ...]}
                                                         + logs 1 | result 1 | logs 2 | result 2 | ...
                                                       or {"op": "batch-failed", "text", "category"}

`limits` is `cobatch.BatchLimits` as a dict; `failed` is `{"text", "category"}` or null (then
`size` bytes of result follow the job's logs); a job's logs are a JSON list of the lines it
printed. The lines travel in the body, not the header, because a header is capped
(`channel.MAX_HEADER_BYTES`) and a batch of jobs may each print up to `max_log_bytes`.
"batch-failed" means the batch as a whole went wrong in the worker (a bug of ours, memory
exhausted between jobs); the worker exits after it and the parent runs each job alone.
Neither side trusts the other's numbers: sizes that do not add up to the body are a
malformed message (`MalformedBatch`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

from .cobatch import BatchLimits, JobOutcome
from .errors import JobFailed

__all__ = [
    "OP_BATCH", "OP_BATCH_DONE", "OP_BATCH_FAILED", "MalformedBatch", "decode_outcomes", "encode_batch",
    "encode_outcomes", "limits_from_json", "split_payloads",
]

OP_BATCH = "batch"
OP_BATCH_DONE = "batch-done"
OP_BATCH_FAILED = "batch-failed"


class MalformedBatch(ValueError):
    """A batch message whose sizes, outcomes or logs do not make sense; the peer is broken."""


def encode_batch(payloads: Sequence[bytes], limits: BatchLimits) -> tuple[dict[str, Any], bytes]:
    """The parent's batch message: header and the payloads back to back."""
    header = {"op": OP_BATCH, "sizes": [len(p) for p in payloads], "limits": dataclasses.asdict(limits)}
    return header, b"".join(payloads)


def split_payloads(header: dict[str, Any], body: bytes) -> list[bytes]:
    """The worker's side of `encode_batch`: each job's payload bytes, in order."""
    return _split(body, _sizes(header.get("sizes"), "sizes"))


def limits_from_json(value: Any) -> BatchLimits:
    """`BatchLimits` from the header (unknown fields ignored: an older worker beside a newer
    server still runs the batch)."""
    if not isinstance(value, dict):
        return BatchLimits()
    names = {f.name for f in dataclasses.fields(BatchLimits)}
    return BatchLimits(**{k: v for k, v in value.items() if k in names})


def encode_outcomes(outcomes: Sequence[JobOutcome]) -> tuple[list[dict[str, Any]], bytes]:
    """The worker's answer: the header's `outcomes` list and the body (logs and results)."""
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for outcome in outcomes:
        logs = json.dumps([str(line) for line in outcome.logs], ensure_ascii=False).encode()
        result = outcome.result if outcome.failure is None and outcome.result is not None else b""
        failed = None
        if outcome.failure is not None:
            failed = {"text": outcome.failure.traceback_text, "category": outcome.failure.category}
        entries.append({"log_size": len(logs), "size": len(result), "failed": failed, "rows": int(outcome.rows)})
        chunks += [logs, bytes(result)]
    return entries, b"".join(chunks)


def decode_outcomes(header: dict[str, Any], body: bytes, count: int) -> list[JobOutcome]:
    """The parent's side of `encode_outcomes`: `count` outcomes, or `MalformedBatch`."""
    entries = header.get("outcomes")
    if not isinstance(entries, list) or len(entries) != count or not all(isinstance(e, dict) for e in entries):
        raise MalformedBatch(f"a batch of {count} jobs was answered with outcomes {str(entries)[:200]}")
    sizes: list[int] = []
    for entry in entries:
        sizes += [entry.get("log_size"), entry.get("size")]
    pieces = _split(body, _sizes(sizes, "outcome sizes"))
    outcomes = []
    for index, entry in enumerate(entries):
        logs_bytes, result = pieces[2 * index], pieces[2 * index + 1]
        try:
            logs = json.loads(logs_bytes)
        except (ValueError, RecursionError):
            raise MalformedBatch("a batch outcome's printed lines are not JSON") from None
        if not isinstance(logs, list) or not all(isinstance(line, str) for line in logs):
            raise MalformedBatch("a batch outcome's printed lines are not a list of strings")
        rows = entry.get("rows", 0)
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
            raise MalformedBatch(f"a batch outcome's rows is {rows!r}")
        failed = entry.get("failed")
        if failed is None:
            outcomes.append(JobOutcome(result=result, logs=logs, rows=rows))
        elif isinstance(failed, dict) and not result:
            text, category = failed.get("text"), failed.get("category")
            outcomes.append(JobOutcome(failure=JobFailed(str(text or "the job failed"), str(category or "user")),
                                       logs=logs, rows=rows))
        else:
            raise MalformedBatch(f"a batch outcome's failure is {str(failed)[:200]}")
    return outcomes


def _sizes(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                              for n in value):
        raise MalformedBatch(f"a batch message's {what} are not a list of byte counts: {str(value)[:200]}")
    return value


def _split(body: bytes, sizes: list[int]) -> list[bytes]:
    if sum(sizes) != len(body):
        raise MalformedBatch(f"a batch message's sizes add up to {sum(sizes)} bytes; its body has {len(body)}")
    view = memoryview(body)
    pieces, offset = [], 0
    for size in sizes:
        pieces.append(bytes(view[offset:offset + size]))
        offset += size
    return pieces
