"""Running a request: a decoded request beside a hosted model, its saved values encoded.

`remote='local'` calls exactly this function in-process, and the server's workers call it
for every job; that is what makes the simulation faithful. The body that runs is compiled
from the request's source text and reads only decoded values, never the caller's objects.
"""

from __future__ import annotations

import contextlib
import traceback
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..contract.local_block import LocalPeer
from ..contract.policy import Policy
from ..contract.result import UnsendableResult, encode_result
from ..errors import TracingError, collecting_warnings
from ..contract.request import TraceRequest
from ..contract.code.decode import CodeDecoder, decode_failure_text, resolve_model_path, restricted_builtins
from ..contract.code.origin import FILE_PREFIX, REMOTE_MODULE, original_filename, remote_filename
from ..contract.guard import JobGuards, guard_module
from ..contract.values.decode import ValueDecoder
from ..tracing.capture import block_from_source, register_source_transform
from ..tracing.namespace import body_namespace
from ..tracing.backend import running_shipped_body
from ..tracing.saving import pop_registry, push_registry
from .errors import JobFailed
from .fake import body_mode
from .hosted import HostedModel
from .integrity import guard_for
from .isolation import clear_grads, keep_edits, restore_edits, restore_grads
from .local_exchange import LOCAL_HELPER, LocalBlockAborted, LocalBlocks
from ..tracing.envoy import source_envoy

if TYPE_CHECKING:
    from .receive import PreparedRequest

__all__ = ["JobBody", "execute_request", "failure_category", "model_modified_text", "prepare_body", "run_prepared",
           "user_traceback"]

# Layer 2 of the sandbox: every body compiled under a shipped file name (the body, and the
# nested `with` blocks captured while shipped code runs) is compiled after the guard transform.
register_source_transform(FILE_PREFIX, guard_module)

def execute_request(
    request: TraceRequest,
    tensors: dict[str, Any],
    model: HostedModel,
    *,
    policy: Policy,
    log: Callable[[str], None] = print,
    local: LocalPeer | None = None,
) -> dict[str, Any]:
    """Run the request's body beside `model`; returns the saved values.

    `local` runs the body's `with interlace.local():` blocks on the client (`local_exchange.py`);
    without one, a body that reaches a local block fails with `local-block-no-client`."""
    # The client model's aliases (`rename=`) hold for this job only (a job holds its model alone).
    with model.renamed(request.rename):
        return _execute(request, tensors, model, policy=policy, log=log, local=local)


def _execute(request: TraceRequest, tensors: dict[str, Any], model: HostedModel, *, policy: Policy,
             log: Callable[[str], None], local: LocalPeer | None) -> dict[str, Any]:
    job = prepare_body(request, tensors, model, policy=policy, log=log, local=local)
    try:
        return _run_body(job, model)
    finally:
        job.guards.close()  # code the job left behind (a `__del__`) stops at its first tick


@dataclass
class JobBody:
    """One job made ready to run beside its model: its guards (the deadline and memory limit
    start when it is made), the body's namespace with its values decoded, and the tracer the
    body runs as (its `args` / `kwargs` are the job's input and options)."""

    request: TraceRequest
    block: Any
    guards: JobGuards
    ns: dict[str, Any]
    tracer: Any


def prepare_body(request: TraceRequest, tensors: dict[str, Any], model: HostedModel, *, policy: Policy,
                 log: Callable[[str], None], local: LocalPeer | None) -> JobBody:
    """Decode the job's values and make its tracer; a failure is the job's `JobFailed`. The
    caller closes `guards` when the job is over. (Shared by a job run alone and one that shares
    a forward, `cobatch.py`.)"""
    # Content-addressed, as shipped functions are (`code/decode.py`): two jobs from files of
    # the same name (two users' `notebook.py`) never show each other's lines in a traceback,
    # even when their failures are formatted after both ran (a shared forward, `cobatch.py`).
    filename = remote_filename(request.block.filename, f"body:{zlib.crc32(request.block.source.encode('utf-8', 'replace')):08x}")
    try:
        block = block_from_source(request.block.source, filename, request.block.first_lineno)
    except (TracingError, SyntaxError) as error:  # a body the checks let through that does not compile
        text = str(error).replace(filename, request.block.filename)
        raise JobFailed(f"{type(error).__name__}: {text}", "invalid-request") from None
    # Layer 2: the job's guards (its deadline and memory limit start now), protecting the
    # hosted model's modules, weights and buffers from the job's writes.
    guards = JobGuards(policy, protected=tuple(model._module.named_modules()), remote_module=REMOTE_MODULE)
    try:
        return _prepare_guarded(request, tensors, model, block, guards, policy=policy, log=log, local=local)
    except BaseException:
        guards.close()
        raise


def _prepare_guarded(request: TraceRequest, tensors: dict[str, Any], model: HostedModel, block: Any,
                     guards: JobGuards, *, policy: Policy, log: Callable[[str], None],
                     local: LocalPeer | None) -> JobBody:
    builtins_dict = restricted_builtins(policy, log, guards)
    objects = {key: spec.model_dump() for key, spec in request.objects.items()}
    decoder = ValueDecoder(tensors, extension=CodeDecoder(objects, policy, builtins_dict, model=model))
    # The engine's one namespace builder: the helpers capture's rewrites call are the same
    # here as in a local trace (only the builtins are the policy's).
    ns = body_namespace(builtins_dict=builtins_dict, name=REMOTE_MODULE)
    # `with interlace.local():` in the body is a call of this (the block runs on the client).
    ns[LOCAL_HELPER] = LocalBlocks(request, model, policy, local, guards)
    # Decoding rebuilds the user's values (and runs their class bodies and decorators): a
    # failure there is the job's error, shown to the user, never an internal server error.
    try:
        for name, node in request.variables.items():
            ns[name] = decoder.decode(node, path=name)
        for name, path in request.model_refs.items():
            ns[name] = resolve_model_path(model, path)
        for path in request.source_modules:  # `.source` the client built before the trace
            source_envoy(resolve_model_path(model, path))
        args = [decoder.decode(a, path="input") for a in request.args]
        kwargs = {k: decoder.decode(v, path=k) for k, v in request.kwargs.items()}
    except Exception as error:  # noqa: BLE001 - WireFormatError, or the user's code raising
        raise JobFailed(decode_failure_text(error), "invalid-request") from None
    try:
        # The user's inputs and options meet the model here: a bad one (an unknown keyword,
        # a wrong input type) is the user's error, reported at the trace's line, never an
        # internal error of the server.
        if request.kind == "trace":
            tracer = model.trace(*args, **kwargs)
        elif request.kind == "generate":
            tracer = model.generate(*args, **kwargs)
        else:
            tracer = model.session()
    except Exception as error:  # noqa: BLE001 - reported to the user as the job's ERROR
        # (No frame of the user's runs there, so it is shown at the `with` line.)
        raise JobFailed(user_traceback(error, request), type(error).__name__) from None
    if block.as_name:
        ns[block.as_name] = tracer
    set_log_line = getattr(tracer, "set_log_line", None)
    if set_log_line is not None:  # `tracer.log(...)` in the body is a LOG line, as `print` is (bounded alike)
        remote_print = builtins_dict.get("print", log)
        set_log_line(lambda line: remote_print(line))
    return JobBody(request, block, guards, ns, tracer)


def _run_body(job: JobBody, model: HostedModel) -> dict[str, Any]:
    request, block, ns, tracer = job.request, job.block, job.ns, job.tracer
    registry = push_registry()
    # Layer 4: the model and the process as the job found them (`integrity.py`).
    guard = guard_for(model)
    before = guard.begin()
    grad_mode = _grad_mode_for(request)
    # (The module walk only for a job that may keep a graph: most run without one.)
    grads = clear_grads(list(model._module.modules())) if grad_mode is _GRAD_ON else None
    edits = keep_edits(model)
    try:
        with grad_mode, running_shipped_body(), body_mode():  # body_mode: a dry run's fake tensors (`fake.py`)
            tracer.run_block(block, ns)
    except LocalBlockAborted as aborted:  # the user's frames down to the block's `with` line, then why
        raise JobFailed(_frames_text(aborted, request) + aborted.text, aborted.category) from None
    except BaseException as error:  # noqa: BLE001 - every failure becomes the job's ERROR
        # (A guard's refusal names its own category: `model-modified` for a weight write.)
        raise JobFailed(user_traceback(error, request), failure_category(error)) from None
    finally:
        pop_registry()
        if grads is not None:
            restore_grads(grads)
        restore_edits(model, edits)
        integrity = guard.verify_and_restore(before)
    changed = integrity.weights
    if changed or integrity.unrestored:
        raise JobFailed(model_modified_text(changed or integrity.unrestored), "model-modified")
    return registry.select(ns, visibly_saved=block.saved_names)


def failure_category(error: BaseException) -> str:
    """The category a job's failure is reported under: a guard's own (`model-modified` for a
    weight write), else the exception's class name."""
    return getattr(error, "category", None) or type(error).__name__


def model_modified_text(changed: list[str]) -> str:
    return (
        "ModelModifiedError: this job changed the hosted model's weights or buffers in place ("
        + ", ".join(changed[:5]) + (", ..." if len(changed) > 5 else "")
        + "). On a shared server the model is read-only between jobs: edit activations "
        "(`module.output[:] = ...`) or work on a copy (`w = model.lm_head.weight.clone()`)."
    )


_GRAD_ON = contextlib.nullcontext()


def _grad_mode_for(request: TraceRequest) -> Any:
    """No autograd graph for jobs that cannot use one.

    Only saved values leave a job, as fresh tensors, so a graph is needed only when the code
    itself asks for gradients; building it roughly doubles a small model's forward time. Any
    mention of `grad` or `backward` in the shipped source keeps grad mode on.
    """
    texts = [request.block.source] + [spec.source for spec in request.objects.values()]
    if any("grad" in text or "backward" in text for text in texts):
        return _GRAD_ON
    return torch.no_grad()


def user_traceback(error: BaseException, request: TraceRequest | None = None) -> str:
    """The traceback with only the user's frames, in their own file names and lines.

    An error raised by the model itself (say, a keyword argument the model does not take) has
    no user frame; it is then shown at the trace's `with` line, as a local run shows it."""
    return _frames_text(error, request) + "".join(traceback.format_exception_only(type(error), error)).rstrip("\n")


def _frames_text(error: BaseException, request: TraceRequest | None) -> str:
    lines = ["Traceback (most recent call last):\n"]
    for frame in traceback.extract_tb(error.__traceback__):
        if not frame.filename.startswith("<interlace-remote:"):
            continue
        lines.append(f'  File "{original_filename(frame.filename)}", line {frame.lineno}, in {_where(frame.name)}\n')
        if frame.line:
            lines.append(f"    {frame.line.strip()}\n")
    if len(lines) == 1 and request is not None:
        lines.extend(_with_line(request))
    return "".join(lines)


def _with_line(request: TraceRequest) -> list[str]:
    block = request.block
    first = block.source.splitlines()[0].strip() if block.source else ""
    lines = [f'  File "{block.filename}", line {block.first_lineno}, in <with block>\n']
    if first:
        lines.append(f"    {first}\n")
    return lines


def _where(name: str) -> str:
    return "<with block>" if name == "<module>" else name


def run_prepared(prepared: "PreparedRequest", model: HostedModel, policy: Policy, log: Callable[[str], None],
                 local: LocalPeer | None = None) -> bytes:
    """Execute and encode the result; failures raise JobFailed with the user's traceback.
    `local`: the client's side of the body's local blocks (`execute_request`)."""
    with collecting_warnings() as caught:  # they travel back with the result
        values = execute_request(prepared.request, prepared.tensors, model, policy=policy, log=log, local=local)
    try:
        return encode_result(values, max_bytes=policy.max_result_bytes, warnings=caught)
    except UnsendableResult as e:
        raise JobFailed(f"UnsendableResult: {e}", "unserializable-result") from None
