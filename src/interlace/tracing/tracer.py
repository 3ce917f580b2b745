"""Trace, invoke and session contexts.

A tracer captures its `with` body (see `capture.py`) into a `CapturedTrace`, hands that to its
backend when the block is entered (`backend.py`: the one seam where local runs, the local
simulation and the server differ) and binds what comes back in the caller's frame. Every
backend ends up calling `Tracer.execute(namespace)` on a tracer, here or (for a body that
crossed the wire) on the hosted model's tracer through `Tracer.run_block`.
"""

from __future__ import annotations

import sys
import types
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Callable, Final

import torch

from ..errors import TracingError
from .capture import Block, BodySkipper, SkipBody, capture_block
from .local_block import local
from .frames import NAMESPACE_MARKER, clean_traceback, is_namespace, push_to_frame
from .interleaver import Interleaver, Mediator, StopForward, current_mediator
from .inline import run_one_read
from .reads import first_read_index, inline_plan
from .saving import SaveRegistry, pop_registry, push_registry
from .unsaved import unsaved_placeholders
from .namespace import FrameNames, new_namespace
from .backend import CapturedTrace, LocalBackend, TraceOutcome

if TYPE_CHECKING:
    from .host import Host
    from .iteration import IterProxy, StepLoop

__all__ = ["MSG_INVOKE_INSIDE_RUN", "MSG_NO_INPUT", "Barrier", "InterleavingTracer", "Invoker", "Session", "Tracer"]


def _entered_frame() -> types.FrameType:
    """The user's frame that executes the `with` statement (skipping wrapper __enter__s)."""
    frame = sys._getframe(2)
    while frame.f_code.co_name == "__enter__":
        frame = frame.f_back  # type: ignore[assignment]
    return frame



MSG_INVOKE_INSIDE_RUN: Final = """\
tracer.invoke(...) cannot be used inside a trace that already has an input or inside another \
invoke. Give the trace no input and put each input in its own invoke:

    with model.trace() as tracer:
        with tracer.invoke(a):
            ...
        with tracer.invoke(b):
            ..."""

MSG_NO_INPUT: Final = (
    "Every invoke in this trace is empty, so there is no input to run the model on. "
    "Pass the input to one invoke: `with tracer.invoke(inputs):`."
)
_new_tuple = tuple.__new__


def user_variables(ns: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ns.items() if not (k.startswith("__") and k.endswith("__")) and not k.startswith("__interlace")}


class Tracer:
    """Base of every `with` context that captures its body."""

    kind = "session"
    # Set while the `with` block is entered and run (class defaults: a trace's set-up runs
    # with cold caches next to a forward, so it does no more than it must).
    block: Block | None = None
    _frame: types.FrameType | None = None
    _skipper: Any = None
    _registry: SaveRegistry | None = None
    _nested = False
    job: Any = None  # the server job of a remote run (a backend's `TraceOutcome.job`)
    _pending = False  # the backend bound placeholders: the values are still on a server

    def __init__(self, model: "Host | None", *args: Any, backend: Any = None, **kwargs: Any) -> None:
        self.model = model
        self.args = args
        self.kwargs = kwargs
        self.backend = backend

    # -- capture ------------------------------------------------------------------------------

    def __enter__(self) -> "Tracer":
        frame = sys._getframe(1)
        while frame.f_code.co_name == "__enter__":  # skip wrapping context managers' __enter__
            frame = frame.f_back  # type: ignore[assignment]
        block = self.block = capture_block(frame, self._describe())
        self._frame = frame
        self._nested = NAMESPACE_MARKER in frame.f_globals
        # Design note: the whole run happens here, before the body, and the body is then
        # skipped. Python never stores the `as` target (the body is skipped at its first
        # opcode, which is that store), so it is bound with the results, by the skipper's
        # trace callback: CPython writes a function's locals back after a trace callback,
        # which saves the cold ctypes call `push_to_frame` needs anywhere else.
        self._registry = push_registry()
        try:
            values = self._run_backend()
        except BaseException as error:
            partial = getattr(error, "_interlace_partial", None) or {}
            if block.as_name:
                partial = {block.as_name: self, **partial}
            if partial:
                push_to_frame(frame, partial)
            error.__traceback__ = clean_traceback(error.__traceback__)
            raise error from error.__cause__
        finally:
            pop_registry()
            self._frame = None
        if not self._nested and not self._pending:
            # The body's other names say, when used, that they were not saved (`unsaved.py`);
            # a non-blocking run's backend binds its own placeholders for every name.
            missing = unsaved_placeholders(block, values)
            if missing:
                values = {**missing, **values}
        if block.as_name:
            values = {block.as_name: self, **values}
        self._skipper = BodySkipper(frame, values)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        skipper = self._skipper
        frame = skipper.frame
        skipper.restore()
        if exc_type is SkipBody:
            return True
        unbound = skipper.unbound()  # an exception came before the body (e.g. Ctrl-C)
        if unbound and frame is not None:
            push_to_frame(frame, unbound)
        return False

    def _describe(self) -> str:
        return "model.trace(...)"

    # -- body-side API of every context -------------------------------------------------------

    _log_line: Callable[[str], None] | None = None

    def local(self) -> AbstractContextManager[None]:
        """`with tracer.local():` the same as `with interlace.local():` (`local_block.py`):
        in a remote trace the block runs on the client; here it simply runs."""
        return local()

    def log(self, *args: Any, sep: str = " ", end: str = "") -> None:
        """Like `print` in the body: on a server, one line of the job's log, which the client
        shows as it arrives; here (and inside a local block) printed. A tensor shows without
        its autograd history (`grad_fn=`), which is no part of its value and which a server's
        run, without autograd unless the body asks for gradients, does not have: the same line
        in every mode."""
        line = sep.join(str(a.detach() if isinstance(a, torch.Tensor) and a.requires_grad else a) for a in args) + end
        log_line = self._log_line
        if log_line is not None:
            log_line(line)
        else:
            print(line)

    def set_log_line(self, log_line: Callable[[str], None] | None) -> None:
        """Where `log` sends its lines (the server's job log); None: print them."""
        self._log_line = log_line

    def _run_backend(self) -> dict[str, Any]:
        backend = self.backend
        if backend is None or type(backend) is LocalBackend:
            # The engine's own backend runs this tracer here: what `LocalBackend()(trace)`
            # does, without building the captured value first. Every local trace comes
            # here, cold, next to a forward; each object and call less is measurable
            # (`bench/overhead.py`, fixed cost).
            return self.run(self.namespace_from_caller())
        # (`tuple.__new__` skips the NamedTuple's Python-level constructor.)
        trace = _new_tuple(CapturedTrace, (self.kind, self.block, self.args, self.kwargs, FrameNames(self._frame), self.model, self))
        out = backend(trace)
        if type(out) is dict:
            return out
        if isinstance(out, TraceOutcome):
            self.job = out.job
            self._pending = out.pending
            return out.values
        return dict(out)

    # -- what backends run --------------------------------------------------------------------

    def namespace_from_caller(self) -> dict[str, Any]:
        """The body's namespace: the names it reads, from the caller's frame."""
        assert self.block is not None and self._frame is not None
        ns = new_namespace(self.block, self._frame)
        if self.block.as_name:
            ns[self.block.as_name] = self
        return ns

    def run(self, ns: dict[str, Any]) -> dict[str, Any]:
        """Run the body in `ns`; the values to bind. A failure carries the values saved
        before it (`_interlace_partial`, bound by `__enter__`)."""
        try:
            self.execute(ns)
        except BaseException as error:
            error._interlace_partial = self.results(ns)  # type: ignore[attr-defined]
            raise
        return self.results(ns)

    def run_block(self, block: Block, ns: dict[str, Any]) -> None:
        """Run `block` (a body that crossed the wire) in `ns` as this tracer's body."""
        self.block = block
        self.execute(ns)

    def results(self, ns: dict[str, Any]) -> dict[str, Any]:
        """What to bind in the caller: saved values for the outermost trace, all for inner ones."""
        if not self._nested:
            assert self._registry is not None and self.block is not None
            return self._registry.select(ns, self.block.stored_names, self.block.saved_names)
        return user_variables(ns)

    def execute(self, ns: dict[str, Any]) -> None:
        """Run the body in `ns` (a session: inner traces run as they are reached)."""
        assert self.block is not None
        exec(self.block.code, ns)


class Session(Tracer):
    """`with model.session():` groups traces; values flow between them without saving."""

    kind = "session"

    def _describe(self) -> str:
        return "model.session()"


class InterleavingTracer(Tracer):
    """`with model.trace(inputs):` runs the model once with the body beside it."""

    kind = "trace"
    _collecting = False  # while the body runs to collect invokes
    _interleaver: Interleaver | None = None  # while the model runs
    _first_read: int | None = None  # module whose output a lone body reads first (see _run)
    _plan: list[tuple[Any, tuple[int, ...], list[int] | None]] | None = None  # a lone body's inline statements
    output: Any = None  # the traced call's return value

    def __init__(self, model: "Host", *args: Any, backend: Any = None, **kwargs: Any) -> None:
        self.model = model
        self.args = args
        self.kwargs = kwargs
        self.backend = backend
        self._invokes: list[tuple[Block, dict[str, Any], Any]] = []

    def _describe(self) -> str:
        return "model.trace(...)"

    # -- body-side API ------------------------------------------------------------------------

    def invoke(self, *args: Any, **kwargs: Any) -> "Invoker":
        """One input (or, with no arguments, the whole batch) with its own body."""
        if not self._collecting:
            if current_mediator() is not None:
                raise TracingError(MSG_INVOKE_INSIDE_RUN)
            raise TracingError("tracer.invoke(...) can only be used inside its trace's `with` block.")
        return Invoker(self, args, kwargs)

    def stop(self) -> None:
        """End the forward here; values saved so far are kept, later code does not run."""
        mediator = current_mediator()
        if mediator is None:
            raise TracingError("tracer.stop() can only be called while the model runs (inside an invoke or a trace with input).")
        mediator.stop()

    def barrier(self, parties: int) -> "Barrier":
        """A meeting point for `parties` invokes at the same module (activation patching)."""
        return Barrier(parties)

    @property
    def iter(self) -> "IterProxy":
        """Loop over steps: `for step in tracer.iter[0:3]:` (see `tracing/iteration.py`)."""
        from .iteration import IterProxy

        return IterProxy(self)

    def all(self) -> "StepLoop":
        """Every step of the run: `for step in tracer.all():`."""
        return self.iter[:]

    def cache(
        self,
        modules: Any = None,
        device: Any = "cpu",
        dtype: Any = None,
        detach: bool = True,
        include_output: bool = True,
        include_inputs: bool = False,
    ) -> Any:
        """Every (or the named) module's outputs of this run, after edits (see `tracing/cache.py`).

        The arguments and their order are nnsight's."""
        from .cache import start_cache

        return start_cache(self, modules, device=device, dtype=dtype, detach=detach,
                           include_output=include_output, include_inputs=include_inputs)

    @property
    def result(self) -> Any:
        """The traced call's return value (the model output, or the generated ids)."""
        return self.model._result_envoy(self.kind).output  # type: ignore[union-attr]

    def next(self, step: int = 1) -> None:
        mediator = current_mediator()
        if mediator is None:
            raise TracingError("tracer.next() can only be called while the model runs.")
        mediator.step += step

    # -- running ------------------------------------------------------------------------------

    def execute(self, ns: dict[str, Any]) -> None:
        model: Host = self.model  # type: ignore[assignment]
        model._before_run()
        has_input = model._has_input(self.args, self.kwargs)
        if has_input:
            prepared = [model._prepare_input(*self.args, **self.kwargs)]
            mediators = [Mediator(self.block.code, ns, None, 0, "trace body")]  # type: ignore[union-attr]
        else:
            self._collecting = True
            try:
                exec(self.block.code, ns)
            finally:
                self._collecting = False
            if not self._invokes:
                return
            prepared = []
            mediators = []
            start = 0
            # The invokes' namespace (the trace body's) holds this tracer: drop the list so
            # no cycle keeps the run's values alive until a garbage collection.
            invokes, self._invokes = self._invokes, []
            for i, (block, invoke_ns, prep) in enumerate(invokes):
                group = None
                if prep is not None:
                    size = prep[2]
                    group = (start, size)
                    start += size
                    prepared.append(prep)
                mediators.append(Mediator(block.code, invoke_ns, group, i, label=f"invoke {i}"))
            if not prepared:
                raise TracingError(MSG_NO_INPUT)
            if len(prepared) == 1:  # one input: every invoke sees the whole batch
                for m in mediators:
                    m.group = None
        edits = model._edit_mediators(ns)
        if edits:
            mediators = edits + mediators
            for i, m in enumerate(mediators):
                m.index = i
        elif has_input:
            block: Block = self.block  # type: ignore[assignment]
            if block.segments is not None:
                self._plan = inline_plan(block.segments, ns, model, self)
            if self._plan is None and block.first_read is not None:
                self._first_read = first_read_index(block.first_read, ns, model)
        args, kwargs, batch_size = model._batch(prepared)
        if not has_input and self.kwargs:  # e.g. `model.generate(max_new_tokens=3)` with invokes
            kwargs = {**model._trace_options(self.kwargs), **kwargs}
        self._run(mediators, args, kwargs, batch_size)

    def _run(self, mediators: list[Mediator], args: tuple, kwargs: dict, batch_size: int) -> None:
        model: Host = self.model  # type: ignore[assignment]
        forward = True
        plan = self._plan
        if plan is not None and len(plan) == 1 and self.kind == "trace":
            segment, reads, steps = plan[0]
            d = model.__dict__
            if steps is None and len(reads) == 1 and d["_active"] is None and model._runs_without_interleaver():
                d["_active"] = self  # (a trace started meanwhile is refused, as in `_begin_run`)
                try:
                    ran = run_one_read(
                        mediators[0], segment.code, d["_modules_list"][reads[0]], d["_paths_list"],
                        lambda: model._call_model(self.kind, args, kwargs, None),
                    )
                finally:
                    d["_active"] = None
                if ran is not None:
                    forward, self.output = False, ran[1]
                    if ran[0]:
                        return
                    # The module never ran: the general run's bookkeeping, without its
                    # forward, raises the same error at the same line.
        il = model._new_interleaver(mediators, batch_size, self._steps())
        self._interleaver = il
        if plan is not None:
            il.run_inline(mediators[0], plan, self.block)
        model._begin_run(il)
        try:
            if self._first_read is not None:
                il.defer_start(mediators[0], self._first_read)
            if il.start():
                try:
                    if forward:
                        self.output = model._call_model(self.kind, args, kwargs, il)
                except StopForward:
                    pass
                else:
                    il.finish(generation=self.kind == "generate")
        finally:
            model._end_run(il)
            il.close()
            self._interleaver = None

    def _steps(self) -> int | None:
        return 1


class Invoker:
    """`with tracer.invoke(inputs):` one input of a batched trace, with its own body."""

    def __init__(self, tracer: InterleavingTracer, args: tuple, kwargs: dict) -> None:
        self.tracer = tracer
        self.args = args
        self.kwargs = kwargs
        self._skipper: Any = None

    def __enter__(self) -> "Invoker":
        frame = _entered_frame()
        self.block = capture_block(frame, "tracer.invoke(...)")
        self._frame = frame
        self._skipper = BodySkipper(frame)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self._skipper.restore()
        if exc_type is not None and exc_type is not SkipBody:
            return False
        frame = self._frame
        if is_namespace(frame.f_globals):
            ns = frame.f_globals
        else:  # an invoke inside a helper function: its variables come from that function
            ns = new_namespace(self.block, frame)
        if self.block.as_name:
            ns[self.block.as_name] = self
        prep = None
        if self.args or self.kwargs:
            prep = self.tracer.model._prepare_input(*self.args, **self.kwargs)  # type: ignore[union-attr]
        self._prepared = prep
        self.tracer._invokes.append((self.block, ns, prep))
        self._frame = None
        return True

    _prepared: Any = None
    _inputs: Any = None

    @property
    def inputs(self) -> tuple[tuple, dict]:
        """This invoke's prepared input as the model gets it, `(args, kwargs)` (for a language
        model `((), {"input_ids": ..., "attention_mask": ...})`, unpadded), as in nnsight;
        `((), {})` for an empty invoke. Readable in the invoke's body."""
        if self._inputs is None:
            prep = self._prepared
            if prep is None:
                self._inputs = ((), {})
            else:
                args, kwargs, _ = self.tracer.model._batch([prep])  # type: ignore[union-attr]
                self._inputs = (tuple(args), dict(kwargs))
        return self._inputs


class Barrier:
    """Call the barrier in each participating invoke; all resume together, in invoke order."""

    def __init__(self, parties: int) -> None:
        if parties < 1:
            raise TracingError("tracer.barrier(n) needs n >= 1 invokes.")
        self.parties = parties
        self.arrived: list[Mediator] = []

    def __call__(self) -> None:
        mediator = current_mediator()
        if mediator is None:
            raise TracingError("A barrier can only be called inside an invoke while the model runs.")
        mediator.wait_barrier(self)
