"""Co-batching: several users' small jobs on one model run as one batched forward.

The one place that says which jobs may share a forward (`solo_reason`) and how a batch of
them runs (`run_batch`). The server gathers queued jobs whose `share_key` is equal (see
`server/workers.py`) and hands them here; the worker process runs this same function
(`execution/worker.py`), so the thread and process runners batch alike.

Which jobs share (the rule, in one place)
-----------------------------------------
A job may share a forward when all of these hold; otherwise it runs alone, exactly as
before co-batching existed (`solo_reason` names the first that fails):

- it is a `model.trace(input)`: one input given to the trace, no `tracer.invoke(...)`
  (generate calls and sessions run alone);
- it has no `with interlace.local():` block (a block pauses the job for the client);
- it renames no module (`rename=`) and built no `.source` before the trace;
- its shipped code uses none of the features that act on the whole batch, the graph or the
  module tree: the words `grad`/`backward` anywhere (a job that may need autograd), or the
  attributes `.invoke`, `.barrier`, `.cache`, `.skip`, `.source`, `.edit`, `.session`,
  `.iter`/`.all`/`.next` (steps). The test is on the text, so it errs towards running alone.

At run time, in the worker, two more conditions hold:

- jobs share only with jobs whose input has the same number of tokens, none of it padding,
  and the same model options: Interlace never pads one job's rows to another's length, so
  a job sees the shapes, positions and mask it would see alone;
- anything a sharing job does that cannot be made exact (a `.skip`, a barrier, a module
  called with `hook=True`, an edit to a value that is not its own rows, a memory limit
  reached while others ran) sends that job to run again alone, from the start, after the
  batch; what it printed in the shared attempt is dropped.

Isolation (design note)
-----------------------
A sharing job's body reads and edits private copies of its own rows (never views into the
batch: a view's storage would show the neighbours' rows), its edits are written back into
its rows only, its saves go to its own registry, its clock counts only its own body and the
shared forward, and its exception ends only its own body. A batch whose forward itself fails,
or after which the model's weights differ, is run again job by job. See `tracing/shared.py`.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..contract.guard import JobGuards, JobLimitExceeded
from ..contract.policy import Policy
from ..contract.request import TraceRequest
from ..contract.result import UnsendableResult, encode_result
from ..errors import swap_warnings
from ..tracing.backend import running_shipped_body
from ..tracing.shared import SharedBody, run_shared
from .errors import JobFailed
from .hosted import HostedModel
from .integrity import guard_for
from .isolation import keep_edits, restore_edits
from .run import JobBody, failure_category, prepare_body, run_prepared, user_traceback

__all__ = [
    "CATEGORY_INTERNAL", "MSG_INTERNAL", "BatchLimits", "JobOutcome", "ShareKey", "SOLO_FEATURES", "estimated_rows", "run_batch", "share_key",
    "solo_reason",
]

#: Names whose use in shipped code makes a job run alone (each acts on the whole batch, the
#: autograd graph, the module tree or the steps of a run; see the module docstring).
SOLO_FEATURES = ("grad", "backward", "invoke", "barrier", "cache", "skip", "source", "edit", "session", "iter",
                 "all", "next")
# `grad` and `backward` anywhere (the same test that keeps autograd on for a job, `run.py`),
# the others as attributes (`tracer.cache(`, `model.h[0].skip(`, `tracer.all()`).
_SOLO_TEXT = re.compile(r"(grad|backward)|\.\s*(" + "|".join(SOLO_FEATURES[2:]) + r")\b")


@dataclass(frozen=True)
class BatchLimits:
    """How the server co-batches: `max_rows` rows and `max_tokens` tokens per forward at most,
    waiting at most `wait_seconds` for more jobs once one is taken; `enabled=False`: every job
    runs alone (`interlace serve --no-cobatch`)."""

    max_rows: int = 64
    max_tokens: int = 8192
    wait_seconds: float = 0.002
    enabled: bool = True


@dataclass(frozen=True)
class ShareKey:
    """Jobs with equal keys may be handed to `run_batch` together (the worker still groups
    them by token count)."""

    model_key: str
    kind: str
    options: str  # the model options the job passes to `model.trace(...)`, as sent (JSON text)


@dataclass
class JobOutcome:
    """What one job of a batch ended with: `result` bytes or `failure`; the lines it printed
    (`logs`, delivered after the batch); `rows`: the rows of the forward it ran in (0: it ran
    alone)."""

    result: bytes | None = None
    failure: JobFailed | None = None
    logs: list[str] = field(default_factory=list)
    rows: int = 0


def solo_reason(request: TraceRequest) -> str | None:
    """Why `request` must run alone, or None if it may share a forward (the module docstring's rule)."""
    if request.kind != "trace":
        return f"a model.{request.kind}(...) runs alone"
    if not request.args and "input_ids" not in request.kwargs:
        return "a trace without an input given to model.trace(...) (invokes) runs alone"
    if request.local_blocks:
        return "a job with `with interlace.local():` blocks runs alone"
    if request.rename:
        return "a job that renames modules runs alone"
    if request.source_modules:
        return "a job that built `.source` before the trace runs alone"
    for text in [request.block.source, *(spec.source for spec in request.objects.values())]:
        found = _SOLO_TEXT.search(text)
        if found is not None:
            return f"a job that uses `{found.group(1) or found.group(2)}` runs alone"
    return None


def share_key(request: TraceRequest) -> ShareKey | None:
    """The key under which `request` may share a forward, or None when it runs alone."""
    if solo_reason(request) is not None:
        return None
    options = json.dumps(request.kwargs, sort_keys=True, separators=(",", ":"))
    return ShareKey(request.model_key, request.kind, options)


def estimated_rows(request: TraceRequest) -> int:
    """How many rows the job's input has, as far as the request says without tokenizing (a
    list of prompts or of id lists: its length; anything else: 1)."""
    if not request.args:
        return 1
    node = request.args[0]
    if isinstance(node, dict) and node.get("$t") == "list":
        items = node.get("items") or []
        if items and all(isinstance(i, str) or (isinstance(i, dict) and i.get("$t") == "list") for i in items):
            return len(items)
    return 1


def run_batch(jobs: Sequence[Any], model: HostedModel, policy: Policy,
              limits: BatchLimits | None = None) -> list[JobOutcome]:
    """Run `jobs` (each a `receive.PreparedRequest`, normally with equal `share_key`s) on
    `model`, sharing forwards where the rule allows; one `JobOutcome` per job, in order. Never
    raises for a job's failure: each outcome carries its own."""
    limits = limits or BatchLimits()
    outcomes = [JobOutcome() for _ in jobs]
    alone: list[int] = []
    ready: list[_Ready] = []
    for index, job in enumerate(jobs):
        key = share_key(job.request)
        if key is None or not limits.enabled:
            alone.append(index)
            continue
        try:
            body = prepare_body(job.request, job.tensors, model, policy=policy, log=outcomes[index].logs.append,
                                local=None)
        except JobFailed as failed:
            outcomes[index].failure = failed
            continue
        except Exception:  # noqa: BLE001 - whatever it is, the lone run reports it for this job only
            alone.append(index)
            continue
        shape = _input_shape(model, body)
        if shape is None:  # padded, or an input the model refuses: alone says exactly what
            body.guards.close()
            alone.append(index)
            continue
        ready.append(_Ready(index, body, shape[0], shape[1], shape[2], key))
    for group in _groups(ready, limits):
        if len(group) == 1:
            group[0].body.guards.close()
            alone.append(group[0].index)
        else:
            alone.extend(_run_group(group, model, policy, outcomes))
    for index in sorted(alone):
        outcome = outcomes[index]
        outcome.logs.clear()  # a job sent back from a shared forward: only this run's lines
        outcome.rows = 0
        try:
            outcome.result = run_prepared(jobs[index], model, policy, outcome.logs.append)
        except JobFailed as failed:
            outcome.failure = failed
        except Exception as exc:  # noqa: BLE001 - a bug of ours ends this job only, never its neighbours
            outcome.failure = JobFailed(MSG_INTERNAL.format(error=f"{type(exc).__name__}: {exc}"), CATEGORY_INTERNAL)
    return outcomes


#: A job that met a bug of the server's own (the worker process is replaced after it).
CATEGORY_INTERNAL = "internal-error"
MSG_INTERNAL = ("Internal server error while running the job: {error}\nThis is a server problem, not your code; "
                "report it to the server operator with the job id.")


@dataclass
class _Ready:
    """A job made ready to share: its body, its prepared input, its rows and width."""

    index: int
    body: JobBody
    prepared: Any
    rows: int
    width: int
    key: ShareKey


def _input_shape(model: HostedModel, body: JobBody) -> tuple[Any, int, int] | None:
    """(prepared input, rows, tokens per row) when the job's input has no padding; else None."""
    tracer = body.tracer
    try:
        prepared = model._prepare_input(*tracer.args, **tracer.kwargs)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - the job's own error, reported when it runs alone
        return None
    held = prepared[1].get("__rows__") if isinstance(prepared[1], dict) else None
    if isinstance(held, torch.Tensor):
        return (prepared, int(held.shape[0]), int(held.shape[1])) if held.dim() == 2 else None
    if isinstance(held, tuple) and len(held) == 2:
        rows, masks = held
        widths = {len(r) for r in rows}
        if len(widths) == 1 and all(all(v == 1 for v in m) for m in masks):
            return prepared, len(rows), widths.pop()
    return None


def _groups(ready: list[_Ready], limits: BatchLimits) -> list[list[_Ready]]:
    """Jobs of equal key and width, in order, cut at `max_rows` rows and `max_tokens` tokens.

    A forward's row count never equals its token count, nor is it 1 for a shared forward:
    the engine tells a job's rows of a value by its first dimension being the batch size,
    and a tensor with one row per token (positions) must not be taken for rows."""
    by_kind: dict[tuple[ShareKey, int], list[_Ready]] = {}
    for item in ready:
        by_kind.setdefault((item.key, item.width), []).append(item)
    groups: list[list[_Ready]] = []
    for (_, width), items in by_kind.items():
        group: list[_Ready] = []
        rows = 0
        for item in items:
            if group and (rows + item.rows > limits.max_rows or (rows + item.rows) * width > limits.max_tokens):
                groups.append(group)
                group, rows = [], 0
            group.append(item)
            rows += item.rows
        if group:
            groups.append(group)
    for group in list(groups):
        if len(group) > 1 and sum(item.rows for item in group) == group[0].width:
            groups.append([group.pop()])  # (see the docstring) the last job runs in a forward of its own
    return groups


def _run_group(group: list[_Ready], model: HostedModel, policy: Policy, outcomes: list[JobOutcome]) -> list[int]:
    """One shared forward for `group`; fills the outcomes of the jobs it settles and returns
    the indices of those that must run alone."""
    total = sum(item.rows for item in group)
    clocks = _Clocks()
    bodies = []
    for item in group:
        item.body.tracer.block = item.body.block
        caught: list[tuple[type[Warning], str]] = []
        bodies.append(SharedBody(item.body.tracer, item.body.ns, item.prepared,
                                 enter=clocks.enter_fn(item.body.guards, caught), leave=clocks.leave))
        clocks.caught.append(caught)
    clocks.start([item.body.guards for item in group], [item.rows for item in group])
    guard = guard_for(model)
    before = guard.begin()
    edits = keep_edits(model)
    failed = False
    try:
        with torch.no_grad(), running_shipped_body():
            run_shared(model, bodies)
    except BaseException:  # noqa: BLE001 - the forward itself failed: every job runs alone
        failed = True
    finally:
        restore_edits(model, edits)
        integrity = guard.verify_and_restore(before)
    if failed or integrity.weights or integrity.unrestored:
        for item in group:
            item.body.guards.close()
        return [item.index for item in group]
    alone = []
    for item, shared, caught in zip(group, bodies, clocks.caught):
        guards = item.body.guards
        outcome = outcomes[item.index]
        try:
            if shared.solo is not None or _memory_tripped(shared.error, guards):
                alone.append(item.index)
                continue
            outcome.rows = total
            if shared.error is not None:
                error = shared.error
                shared.error = None
                outcome.failure = JobFailed(user_traceback(error, item.body.request), failure_category(error))
                continue
            values = shared.registry.select(item.body.ns, visibly_saved=item.body.block.saved_names)
            try:
                outcome.result = encode_result(values, max_bytes=policy.max_result_bytes, warnings=caught)
            except UnsendableResult as e:
                outcome.failure = JobFailed(f"UnsendableResult: {e}", "unserializable-result")
        finally:
            guards.close()
    return alone


def _memory_tripped(error: BaseException | None, guards: JobGuards) -> bool:
    """A job's memory limit reached in a shared forward may be its neighbours' memory (the
    process is shared): such a job runs again alone to be sure."""
    return isinstance(error, JobLimitExceeded) and guards.tripped is not None and "memory" in guards.tripped


class _Clocks:
    """Each job's wall clock in a shared forward, and its warnings.

    A job is charged its own body's time and its share of the rest (the forward, by rows:
    what its rows would have cost alone, near enough), never its neighbours' bodies: a job
    that passes its time limit alone passes it beside 63 others, and a spinner beside it
    does not time it out. The deadline is set each time the body is entered; while it runs,
    its charge and the wall clock advance together, so the guard's tick needs no change."""

    def __init__(self) -> None:
        self.caught: list[list[tuple[type[Warning], str]]] = []
        self._start = 0.0
        self._bodies_time = 0.0  # time spent in every body so far
        self._own: dict[int, float] = {}
        self._share: dict[int, float] = {}
        self._entered: tuple[JobGuards, float, Any] | None = None

    def start(self, all_guards: list[JobGuards], rows: list[int]) -> None:
        self._start = time.monotonic()
        total = sum(rows)
        for guards, n in zip(all_guards, rows):
            self._own[id(guards)] = 0.0
            self._share[id(guards)] = n / total

    def enter_fn(self, guards: JobGuards, caught: list[tuple[type[Warning], str]]) -> Callable[[], None]:
        def enter() -> None:
            key = id(guards)
            now = time.monotonic()
            rest = (now - self._start) - self._bodies_time  # the forward's time so far, and the engine's
            charged = self._own[key] + rest * self._share[key]
            guards.deadline = now + guards.timeout - charged
            self._entered = (guards, now, swap_warnings(caught))

        return enter

    def leave(self) -> None:
        entered, self._entered = self._entered, None
        if entered is None:
            return
        guards, since, outer = entered
        spent = time.monotonic() - since
        self._bodies_time += spent
        self._own[id(guards)] += spent
        swap_warnings(outer)
