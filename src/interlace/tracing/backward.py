"""Gradients inside traces: `with loss.backward(): g = h.grad`.

Design note
-----------
PyTorch's `loss.backward()` returns None, so `with loss.backward():` cannot work by itself.
Instead of patching `torch.Tensor.backward` for the whole process (the peer does), the body
compiler (`capture.py`) rewrites, inside captured bodies only:

- `with X.backward(args):`  ->  `with __interlace_backward__(X, args):`
- inside such a block, `T.grad`  ->  `__interlace_backward__.grad(T)` and
  `T.grad = v`  ->  `__interlace_backward__.set_grad(T, v)`.

A plain `loss.backward()` statement is left alone and behaves exactly as in PyTorch, and
`.grad` outside a backward block is the ordinary attribute (e.g. a parameter's accumulated
gradient). Reading `.grad` inside a helper function called from the block is not rewritten:
pass the gradient to the helper instead.

The backward pass runs in a helper thread while the block runs in its own place (the trace's
body greenlet). Reading `h.grad` puts a one-shot hook on `h` and lets the backward run until
that hook fires; the hook hands the gradient over and waits while the block reads it or
assigns a replacement, which is what the hook then returns, so everything upstream sees it.
A thread (not a greenlet) is used because autograd runs hooks of CUDA tensors on its own
device threads, where a greenlet switch is impossible.

Gradients arrive in the reverse order of the forward (the last computed tensor first). The
rewrite also hands the context the plain names whose `.grad` the block uses (`h0.grad`), and
those tensors are watched from the start of the backward: each gradient is kept as it passes,
so the block may read them in any order. Only a gradient the block is waiting for when it
arrives can be replaced (`h.grad = v`), so replacements must still go last layer first. A
tensor held in a plain list, tuple or dict (`hs[i].grad`) is watched too; one reached through
another expression (`model.layer.output.grad`) only from the moment it is read. A tensor that
is not on the path to the loss never gets one (for example `out[0]` indexed *after* the
forward from a module output: take the module output itself, or index it before computing
the loss); the error then tells the two cases apart by walking the autograd graph.
"""

from __future__ import annotations

import ast
import copy
import queue
import threading
from typing import Any

import torch

from ..errors import MissedProviderError, TracingError
from .frames import user_location

__all__ = ["BACKWARD_HELPER", "BackwardContext", "backward_helper", "rewrite_backward"]

#: Name under which rewritten bodies reach this module (see `capture.py`).
BACKWARD_HELPER = "__interlace_backward__"
#: The keyword that passes the block's watched tensors (`_BackwardRewriter`).
WATCH_KEYWORD = "__interlace_watch__"

_GRAD = "grad"
_DONE = "done"


class BackwardContext:
    """What `with loss.backward(...):` becomes inside a traced body."""

    #: Lookups of the tensors whose `.grad` the block reads or sets (see `_BackwardRewriter`).
    watch_first: tuple[Any, ...] = ()

    def __init__(self, tensor: Any, *args: Any, **kwargs: Any) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise TracingError(
                f"`with x.backward():` needs a tensor, got {type(tensor).__name__}. Compute a "
                "scalar loss from values of the forward, e.g.\n\n"
                "    with model.output.logits.sum().backward():\n        g = h.grad.save()"
            )
        if not tensor.requires_grad:
            raise TracingError(
                "`with loss.backward():` was given a tensor that does not require grad, so it has "
                "no graph. Make sure the forward runs with gradients enabled (not under "
                "torch.no_grad(), and not in model.generate) and that the loss is computed from "
                "module values of the forward."
            )
        self.tensor = tensor
        self.args = args
        self.kwargs = kwargs
        self._to_block: queue.Queue = queue.Queue()
        self._to_backward: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._handles: dict[int, Any] = {}
        self._watched: dict[int, torch.Tensor] = {}  # keeps ids valid while hooked
        self._grads: dict[int, torch.Tensor] = {}
        self._waiting_for: int | None = None
        self._paused: int | None = None  # tensor id whose hook is waiting for the block
        self._replacement: dict[int, Any] = {}
        self._done = False
        self._error: BaseException | None = None

    # -- the `with` protocol ------------------------------------------------------------------

    def __enter__(self) -> "BackwardContext":
        if _active() is not None:
            raise TracingError("`with loss.backward():` blocks cannot be nested; finish the first one.")
        for lookup in self.watch_first:
            try:
                value = lookup()
            except NameError:  # assigned later in the block: watched when it is read
                continue
            # A plain container (`hs[i].grad`) is looked into one level: reading a list,
            # tuple or dict has no side effects, unlike indexing other objects.
            kind = type(value)
            items = value.values() if kind is dict else value if kind is list or kind is tuple else (value,)
            for tensor in items:
                if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                    self._watch(tensor)
        _stack().append(self)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        try:
            self._finish()
        finally:
            _stack().pop()
            for handle in self._handles.values():
                handle.remove()
            self._handles.clear()
            self._watched.clear()
        if exc_type is None and self._error is not None:
            raise self._error
        return False

    # -- block side ---------------------------------------------------------------------------

    def grad(self, tensor: Any) -> Any:
        if not isinstance(tensor, torch.Tensor):
            return tensor.grad
        key = id(tensor)
        if key in self._grads:
            return self._replacement.get(key, self._grads[key])
        if self._done:
            raise self._not_provided(tensor)
        self._watch(tensor)
        self._waiting_for = key
        self._release()
        while True:
            kind, got = self._to_block.get()
            if kind == _DONE:
                self._done = True
                self._waiting_for = None
                if self._error is not None:
                    raise self._error
                raise self._not_provided(tensor)
            if got == key:
                self._waiting_for = None
                self._paused = key
                return self._grads[key]
            # another watched tensor fired first: its hook passed already, keep waiting

    def set_grad(self, tensor: Any, value: Any) -> None:
        if not isinstance(tensor, torch.Tensor):
            tensor.grad = value
            return
        key = id(tensor)
        if key not in self._grads:
            self.grad(tensor)
        if self._paused != key:
            filename, line = user_location()
            raise TracingError(
                f"{filename}:{line}: this gradient was assigned after the backward pass had moved "
                "past the tensor (another tensor's .grad was read since, and gradients arrive "
                "last layer first), so the assignment could not change what flows upstream. "
                "Assign a gradient right after reading it, before reading any other, and write "
                "later layers first:\n\n    g2 = h2.grad\n    h2.grad = g2 * 2\n    g1 = h1.grad  # then earlier layers"
            )
        if isinstance(value, torch.Tensor) and value.shape != self._grads[key].shape:
            raise TracingError(
                f"The new gradient has shape {tuple(value.shape)}, but the tensor's gradient has "
                f"shape {tuple(self._grads[key].shape)}; they must match."
            )
        self._replacement[key] = value

    def _watch(self, tensor: torch.Tensor) -> None:
        key = id(tensor)
        if key in self._handles:
            return
        if not tensor.requires_grad:
            raise TracingError(
                "This tensor does not require grad, so it never gets a gradient. Read `.grad` "
                "of tensors taken from the forward (module outputs or values computed from them)."
            )
        self._watched[key] = tensor
        self._handles[key] = tensor.register_hook(lambda g, key=key: self._on_grad(key, g))

    def _release(self) -> None:
        """Let the backward continue (start it, or let the paused hook return)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run_backward, name="interlace-backward", daemon=True)
            self._thread.start()
        elif self._paused is not None:
            self._paused = None
            self._to_backward.put(None)

    def _finish(self) -> None:
        if self._thread is None:
            # No gradient was read: run the backward here, as plain PyTorch would.
            self._done = True
            self.tensor.backward(*self.args, **self.kwargs)
            return
        if not self._done:
            self._release()
            while self._to_block.get()[0] != _DONE:
                self._release_pending()
            self._done = True
        self._thread.join()

    def _release_pending(self) -> None:
        self._paused = None
        self._to_backward.put(None)

    def _not_provided(self, tensor: torch.Tensor) -> MissedProviderError:
        filename, line = user_location()
        if _reaches(self.tensor, tensor):
            # On the path, so its gradient came and went before the block asked for it: only
            # tensors the block names plainly (`h.grad`) are watched from the start.
            return MissedProviderError(
                f"{filename}:{line}: this tensor's gradient (shape {tuple(tensor.shape)}) had "
                "already passed when the block asked for it. Gradients arrive last layer first, "
                "and only a tensor read as `name.grad` (or `name[i].grad` of a list, tuple or "
                "dict) is watched from the start of the backward pass; one reached through "
                "another expression (an attribute, a call) is watched only from the moment it "
                "is read. Give it a name before the block, or "
                "read the later layer's gradient first:\n\n"
                "    h1 = model.layer1.output\n    h2 = model.layer2.output\n    ...\n"
                "    with loss.backward():\n        g2 = h2.grad.save()  # later layer first\n"
                "        g1 = h1.grad.save()"
            )
        return MissedProviderError(
            f"{filename}:{line}: the backward pass ended without a gradient for this tensor "
            f"(shape {tuple(tensor.shape)}): it is not on the path from the loss. A view taken "
            "after the forward, such as `out[0]` on a module output, is a new tensor the loss "
            "was not computed from: take `h = module.output` and index it only to compute the "
            "loss:\n\n    h = model.layer.output\n    loss = model.output.logits[:, -1].sum()\n"
            "    with loss.backward():\n        g = h.grad[0].save()"
        )

    # -- backward side (helper thread, or autograd's device threads) --------------------------

    def _run_backward(self) -> None:
        try:
            self.tensor.backward(*self.args, **self.kwargs)
        except BaseException as error:  # reported in the block
            self._error = error
        self._to_block.put((_DONE, None))

    def _on_grad(self, key: int, grad: torch.Tensor) -> Any:
        if self._done or key in self._grads:
            return None
        self._grads[key] = grad
        if self._waiting_for != key:
            return None
        self._to_block.put((_GRAD, key))
        self._to_backward.get()
        return self._replacement.get(key)


def _reaches(loss: torch.Tensor, tensor: torch.Tensor) -> bool:
    """Whether `loss` was computed from `tensor` (a walk of the autograd graph; the graph's
    structure outlives the backward pass that freed its buffers)."""
    target = tensor.grad_fn
    seen: set[int] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node is target or (target is None and getattr(node, "variable", None) is tensor):
            return True
        stack.extend(fn for fn, _ in node.next_functions)
    return False


_local = threading.local()


def _stack() -> list[BackwardContext]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def _active() -> BackwardContext | None:
    stack = _stack()
    return stack[-1] if stack else None


class _BackwardHelper:
    """The object rewritten bodies call: `__interlace_backward__(loss, ...)`, `.grad(t)`, `.set_grad(t, v)`."""

    def __call__(self, tensor: Any, *args: Any, **kwargs: Any) -> Any:
        watch = kwargs.pop(WATCH_KEYWORD, ())
        if not isinstance(tensor, torch.Tensor):  # someone else's `.backward()` context manager
            return tensor.backward(*args, **kwargs)
        ctx = BackwardContext(tensor, *args, **kwargs)
        ctx.watch_first = watch
        return ctx

    def grad(self, tensor: Any) -> Any:
        ctx = _active()
        if ctx is None:
            return tensor.grad
        return ctx.grad(tensor)

    def set_grad(self, tensor: Any, value: Any) -> None:
        ctx = _active()
        if ctx is None:
            tensor.grad = value
            return
        ctx.set_grad(tensor, value)


backward_helper = _BackwardHelper()


# -- the body rewrite (used by capture.py) -------------------------------------------------------


def _helper(attr: str | None = None) -> ast.expr:
    node: ast.expr = ast.Name(id=BACKWARD_HELPER, ctx=ast.Load())
    if attr is not None:
        node = ast.Attribute(value=node, attr=attr, ctx=ast.Load())
    return node


def _is_backward_call(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "backward"


class _GradRewriter(ast.NodeTransformer):
    """Inside a backward block: `t.grad` -> helper.grad(t), `t.grad = v` -> helper.set_grad(t, v).
    Collects the plain names whose gradient the block reads or sets (`watched`)."""

    def __init__(self) -> None:
        self.watched: list[str] = []

    def _note(self, node: ast.expr) -> None:
        if isinstance(node, ast.Subscript):  # `hs[i].grad`: the tensors held in `hs`
            node = node.value
        if isinstance(node, ast.Name) and node.id not in self.watched:
            self.watched.append(node.id)

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        self.generic_visit(node)
        if node.attr == "grad" and isinstance(node.ctx, ast.Load):
            self._note(node.value)
            return ast.copy_location(ast.Call(func=_helper("grad"), args=[node.value], keywords=[]), node)
        return node

    def visit_Assign(self, node: ast.Assign) -> ast.AST:
        grads = [t for t in node.targets if isinstance(t, ast.Attribute) and t.attr == "grad"]
        if not grads:
            return self.generic_visit(node)
        if len(node.targets) != 1:
            raise TracingError(f"line {node.lineno}: assign one gradient per statement (`h.grad = g`).")
        target = grads[0]
        self._note(target.value)
        value = self.visit(node.value)
        obj = self.visit(target.value)
        call = ast.Call(func=_helper("set_grad"), args=[obj, value], keywords=[])
        return ast.copy_location(ast.Expr(value=call), node)

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST:
        target = node.target
        if not (isinstance(target, ast.Attribute) and target.attr == "grad"):
            return self.generic_visit(node)
        self._note(target.value)
        obj = self.visit(target.value)
        current = ast.Call(func=_helper("grad"), args=[copy.deepcopy(obj)], keywords=[])
        value = ast.BinOp(left=current, op=node.op, right=self.visit(node.value))
        call = ast.Call(func=_helper("set_grad"), args=[obj, value], keywords=[])
        return ast.copy_location(ast.Expr(value=call), node)


class _BackwardRewriter(ast.NodeTransformer):
    """`with X.backward(...):` -> `with __interlace_backward__(X, ...):`, with `.grad` rewritten inside."""

    def visit_With(self, node: ast.With) -> ast.AST:
        if not any(_is_backward_call(item.context_expr) for item in node.items):
            return self.generic_visit(node)
        grads = _GradRewriter()
        node.body = [grads.visit(self.visit(s)) for s in node.body]
        # `lambda: h0, lambda: h2`: the tensors the block will ask about, looked up when the
        # backward starts so their gradients are kept as they pass, in whatever order the
        # block then reads them. Lambdas, because a name may not be bound yet (it is then
        # skipped) and a closure reads a function's locals as well as globals.
        watch = ast.Tuple(
            elts=[ast.Lambda(args=_NO_ARGS, body=ast.Name(id=name, ctx=ast.Load())) for name in grads.watched],
            ctx=ast.Load(),
        )
        for item in node.items:
            expr = item.context_expr
            if _is_backward_call(expr):
                assert isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute)
                keywords = [*expr.keywords, ast.keyword(arg=WATCH_KEYWORD, value=watch)]
                call = ast.Call(func=_helper(), args=[self.visit(expr.func.value), *expr.args], keywords=keywords)
                item.context_expr = ast.copy_location(call, expr)
        return node


_NO_ARGS = ast.arguments(posonlyargs=[], args=[], vararg=None, kwonlyargs=[], kw_defaults=[], kwarg=None, defaults=[])


def rewrite_backward(stmt: ast.stmt) -> ast.stmt:
    """Rewrite the backward blocks in one statement of a captured body."""
    return _BackwardRewriter().visit(stmt)
