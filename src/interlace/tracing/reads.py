"""What a body reads first, found in its source: the static analysis behind deferred and
inline bodies, and its resolution to module indices when a run starts.

Design note
-----------
A body normally runs on its own greenlet from before the forward, and every value it reads
costs a switch to it and back (15-25 us with the caches a forward leaves cold, more than the
rest of a served value). Two shortcuts need to know, from the source alone, what a body does
before and after its reads:

- deferred start (`first_output_read`): a body whose first act is reading a module's output
  starts when that value is served instead of before the forward;
- inline statements (`body_segments`): a body made only of statements that each *begin* by
  reading module outputs through plain paths and then only compute on those values, assign
  names and save, needs no greenlet at all. Each statement runs on the model's side, inside
  the wrapper that serves its last value (`Interleaver.run_inline`): nothing it does can ask
  for another value, so it never has to wait. Empty accumulators (`logits = list().save()`)
  read nothing and run at once; a step loop around one such statement (`for s in
  tracer.iter[:]: logits.append(m.lm_head.output)`) runs it once per step.

Both are checked again when the run starts (`first_read_index`, `inline_plan`): the path's
root must be an envoy of the traced model, every step a child module (walked on the modules,
running no code), and a call on the path a plain module attribute (for inline statements:
`interlace.save` itself). Anything else keeps the ordinary greenlet body, whose behaviour the
shortcuts must match exactly (`tests/tracing/test_engine_inline.py`).
"""

from __future__ import annotations

import ast
import copy
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .envoy import Envoy
from .inline import READ_NAME
from .saving import save
from .syntax import compile_tree as _compile_tree

if TYPE_CHECKING:
    from .host import Host

__all__ = ["ALL_STEPS", "Read", "Segment", "body_segments", "first_output_read", "first_read_index", "inline_plan"]

#: (root name, steps, (module, attribute) pairs called on the way): `interlace.save(m.h[0].output)`
#: is `("m", (("a", "h"), ("i", 0)), (("interlace", "save"),))`. A last step `("*", 0)` stands
#: for every child of the path in order (`[b.output for b in m.h]`).
Read = tuple[str, tuple[tuple[str, Any], ...], tuple[tuple[str, str], ...]]

_EACH = ("*", 0)


def first_output_read(stmt: ast.stmt) -> Read | None:
    """The path of the `.output` a statement reads before doing anything else, if it does.

    Python evaluates an assignment's value before its targets, a call's callee before its
    arguments, and an attribute's or subscript's object before the rest. Walking down that
    order from the statement, only loads of plain names, constants and module attributes
    (checked when the run starts) may come before the read, so running the body later, when
    that value is ready, is not observable. Assigning to a subscript of the value
    (`m.layer.output[:] = 0`) qualifies (the constant is evaluated first), and so does a list
    comprehension over a plain path whose element starts with the item's `.output`
    (`[b.output for b in m.layers]`: the first item's output is read first; iterating an
    envoy runs no code). Anything else (augmented assignment, loops, other comprehensions,
    calls of anything but a name or `module.name`) returns None and the body starts before
    the forward.
    """
    module_attrs: list[tuple[str, str]] = []
    if isinstance(stmt, ast.Expr):
        node: ast.AST = stmt.value
    elif isinstance(stmt, ast.Assign):
        node = stmt.value
        if isinstance(node, (ast.Constant, ast.Name)) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Subscript):
            node = stmt.targets[0].value  # `x.output[...] = constant`: the target's object is next
    elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
        node = stmt.value
    else:
        return None
    while True:
        if isinstance(node, ast.Attribute):
            if node.attr == "output":
                path = _plain_path(node.value)
                return (*path, tuple(module_attrs)) if path is not None else None
            node = node.value
        elif isinstance(node, ast.Subscript):
            node = node.value
        elif isinstance(node, ast.Call):
            func = node.func
            if not node.args or isinstance(node.args[0], ast.Starred):
                node = func
            elif isinstance(func, ast.Name):
                node = node.args[0]  # a plain name is loaded, then the first argument
            elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                module_attrs.append((func.value.id, func.attr))  # `interlace.save(...)`
                node = node.args[0]
            else:
                node = func
        elif isinstance(node, ast.BinOp):
            node = node.left
        elif isinstance(node, ast.ListComp):
            return _each_item_read(node, tuple(module_attrs))
        else:
            return None


def _each_item_read(node: ast.ListComp, module_attrs: tuple[tuple[str, str], ...]) -> Read | None:
    """`[item.output... for item in path]`: the items' outputs, the first item's first."""
    if len(node.generators) != 1:
        return None
    loop = node.generators[0]
    if loop.ifs or loop.is_async or not isinstance(loop.target, ast.Name):
        return None
    elt: ast.AST = node.elt
    while isinstance(elt, (ast.Subscript, ast.Attribute)) and not (isinstance(elt, ast.Attribute) and elt.attr == "output"):
        elt = elt.value
    if not (isinstance(elt, ast.Attribute) and isinstance(elt.value, ast.Name) and elt.value.id == loop.target.id):
        return None
    path = _plain_path(loop.iter)
    if path is None:
        return None
    return path[0], (*path[1], _EACH), module_attrs


def _plain_path(node: ast.AST) -> tuple[str, tuple[tuple[str, Any], ...]] | None:
    steps: list[tuple[str, Any]] = []
    while True:
        if isinstance(node, ast.Attribute):
            steps.append(("a", node.attr))
            node = node.value
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and type(node.slice.value) is int:
            steps.append(("i", node.slice.value))
            node = node.value
        elif isinstance(node, ast.Name):
            return node.id, tuple(reversed(steps))
        else:
            return None


# -- inline statements -----------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One statement of a body that runs inline (see the design note): `code` is the statement
    alone, `read` what it reads first, `position` its index among the body's statements
    (where a greenlet takes over if the run cannot go on inline).

    `read` is None for an empty accumulator (`logits = list().save()`), which reads nothing
    and runs at once; `constructors` are the builtins it calls, checked when the run starts.
    `loop` is set for a step loop around one inline statement (`for step in tracer.iter[:]:
    logits.append(m.lm_head.output)`): (the tracer's name, the loop's key or `ALL_STEPS` for
    `tracer.all()`, the loop variable); `code` is then the statement inside the loop.
    """

    code: types.CodeType
    read: Read | None
    position: int
    loop: tuple[str, Any, str] | None = None
    constructors: tuple[str, ...] = ()


#: The key of a `tracer.all()` loop.
ALL_STEPS = "all"

#: Builtins an accumulator may be made with (`x = list()`); they run no user code.
_CONSTRUCTORS: dict[str, type] = {"list": list, "dict": dict}


# Nodes whose evaluation runs no user Python beyond operators on the values read (tensors,
# tuples): names, constants, attribute and index loads, arithmetic, tuple and list displays.
_PLAIN_NODES = (
    ast.Expr, ast.Assign, ast.Name, ast.Constant, ast.Attribute, ast.Subscript, ast.Slice,
    ast.Tuple, ast.List, ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop, ast.expr_context,
    ast.Call, ast.ListComp, ast.comprehension,
)  # fmt: skip
_ENVOY_VALUES = ("output", "input", "inputs")


def body_segments(statements: list[ast.stmt], filename: str, stored: set[str] | frozenset[str], save_helper: str,
                  transform: Any = None) -> tuple[Segment, ...] | None:
    """The body as inline statements, or None if any statement is not one (`pass` and bare
    constants are dropped: they do nothing). `transform` (capture's source transform of shipped
    code, if any) is applied to each statement before it is compiled."""
    if transform is not None:
        def compile_tree(tree: ast.Module, filename: str, dont_inherit: bool = True) -> types.CodeType:
            return _compile_tree(transform(copy.deepcopy(tree), filename), filename, dont_inherit=dont_inherit)
    else:
        compile_tree = _compile_tree
    accumulators = _accumulators(statements, save_helper)
    made_at = {position: constructors for position, _, constructors in accumulators.values()}
    segments = []
    for position, stmt in enumerate(statements):
        if isinstance(stmt, ast.Pass) or (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)):
            continue
        if position in made_at:
            code = compile_tree(ast.Module(body=[stmt], type_ignores=[]), filename, dont_inherit=True)
            segments.append(Segment(code, None, position, constructors=made_at[position]))
            continue
        loop = _step_loop(stmt)
        inner = stmt.body[0] if loop is not None else stmt  # type: ignore[attr-defined]
        if loop is not None and (loop[0] in stored or loop[2] == loop[0]):
            return None
        # (a list may only be appended to once it exists: after the statement that makes it)
        known = {name for name, (made, kind, _) in accumulators.items() if kind == "list" and made < position}
        read = _inline_read(inner, save_helper, known)
        if read is None or read[0] in stored or any(name in stored for name, _ in read[2]):
            return None  # (a root reassigned by the body would be resolved wrongly at the start)
        each = read[1][-1:] == (_EACH,)
        if loop is not None and each:
            return None  # (one value per step)
        code = compile_tree(ast.Module(body=[_with_values(inner, each=each)], type_ignores=[]), filename, dont_inherit=True)
        segments.append(Segment(code, read, position, loop=loop))
    return tuple(segments)


def _accumulators(statements: list[ast.stmt], save_helper: str) -> dict[str, tuple[int, str, tuple[str, ...]]]:
    """Names made empty (`x = []`, `x = list().save()`) by a statement of the body and bound
    nowhere else in it: (that statement's position, "list" or "dict", the builtins it calls)."""
    bound: dict[str, int] = {}
    for stmt in statements:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
                bound[node.id] = bound.get(node.id, 0) + 1
    found = {}
    for position, stmt in enumerate(statements):
        made = _accumulator(stmt, save_helper)
        if made is not None and bound.get(made[0]) == 1:
            found[made[0]] = (position, made[1], made[2])
    return found


def _accumulator(stmt: ast.stmt, save_helper: str) -> tuple[str, str, tuple[str, ...]] | None:
    """(name, "list"/"dict", builtins called) for `name = []`, `name = {}`, `name = list()` or
    `name = dict()`, saved (`.save()`) or not."""
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
        return None
    value = stmt.value
    if (
        isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == save_helper
        and len(value.args) == 1 and not value.keywords
    ):  # fmt: skip
        value = value.args[0]
    name = stmt.targets[0].id
    if isinstance(value, ast.List) and not value.elts:
        return name, "list", ()
    if isinstance(value, ast.Dict) and not value.keys:
        return name, "dict", ()
    if (
        isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in _CONSTRUCTORS
        and not value.args and not value.keywords
    ):  # fmt: skip
        return name, value.func.id, (value.func.id,)
    return None


def _step_loop(stmt: ast.stmt) -> tuple[str, Any, str] | None:
    """(tracer name, key, loop variable) of `for v in t.iter[<constant>]:` or
    `for v in t.all():` around exactly one statement, with no `else`."""
    if not isinstance(stmt, ast.For) or stmt.orelse or len(stmt.body) != 1 or not isinstance(stmt.target, ast.Name):
        return None
    it = stmt.iter
    if (
        isinstance(it, ast.Call) and not it.args and not it.keywords and isinstance(it.func, ast.Attribute)
        and it.func.attr == "all" and isinstance(it.func.value, ast.Name)
    ):  # fmt: skip
        return it.func.value.id, ALL_STEPS, stmt.target.id
    if isinstance(it, ast.Subscript) and isinstance(it.value, ast.Attribute) and it.value.attr == "iter" and isinstance(it.value.value, ast.Name):
        key = _constant_key(it.slice)
        if key is not None:
            return it.value.value.id, key, stmt.target.id
    return None


def _constant_key(node: ast.AST) -> Any:
    """The value of a constant step key (`3`, `0:3`, `:`, `[0, 2]`), or None."""
    if isinstance(node, ast.Slice):
        parts = []
        for part in (node.lower, node.upper, node.step):
            if part is None:
                parts.append(None)
            elif isinstance(part, ast.Constant) and type(part.value) is int:
                parts.append(part.value)
            else:
                return None
        return slice(*parts)
    if isinstance(node, (ast.Constant, ast.List, ast.Tuple)):
        try:
            value = ast.literal_eval(node)
        except ValueError:
            return None
        if type(value) is int or (isinstance(value, (list, tuple)) and all(type(v) is int for v in value)):
            return value
    return None


def _with_values(stmt: ast.stmt, each: bool) -> ast.stmt:
    """A copy of `stmt` that takes the value it reads from `READ_NAME` (a list of the items'
    values for a comprehension) instead of through envoys: it runs only once every value has
    been served, and the path to it was checked when the run started (`inline_plan`)."""
    stmt = copy.deepcopy(stmt)
    for node in ast.walk(stmt):
        if each and isinstance(node, ast.ListComp):
            loop = node.generators[0]
            loop.iter = ast.copy_location(ast.Name(id=READ_NAME, ctx=ast.Load()), loop.iter)
            _replace_read(node, ast.Name(id=loop.target.id, ctx=ast.Load()))  # type: ignore[attr-defined]
            break
        if not each:
            _replace_read(stmt, ast.Name(id=READ_NAME, ctx=ast.Load()))
            break
    return stmt


def _replace_read(tree: ast.AST, value: ast.expr) -> None:
    """Put `value` where `tree`'s (only) `.output` read is."""
    for parent in ast.walk(tree):
        for field, child in ast.iter_fields(parent):
            if isinstance(child, ast.Attribute) and child.attr == "output":
                setattr(parent, field, ast.copy_location(value, child))
                return
            if isinstance(child, list):
                for i, item in enumerate(child):
                    if isinstance(item, ast.Attribute) and item.attr == "output":
                        child[i] = ast.copy_location(value, item)
                        return
    raise AssertionError("no read to replace")  # _inline_read found exactly one


def _inline_read(stmt: ast.stmt, save_helper: str, lists: set[str] | frozenset[str] = frozenset()) -> Read | None:
    """What `stmt` reads, if it begins with that read (`first_output_read`) and then only
    evaluates plain nodes, assigns plain names (or into the value read: `m.h.output[:] = 0`),
    saves and appends to `lists` (names the body made empty lists): it cannot ask for another
    value, so it never has to wait."""
    read = first_output_read(stmt)
    if read is None:
        return None
    appends = tuple(pair for pair in read[2] if pair[1] == "append" and pair[0] in lists)
    if appends:  # `logits.append(m.lm_head.output)`: a builtin list's method, not a module's
        read = (read[0], read[1], tuple(pair for pair in read[2] if pair not in appends))
    if isinstance(stmt, ast.Assign):
        for target in stmt.targets:
            names = target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]
            if not all(isinstance(t, ast.Name) for t in names) and not (
                isinstance(target, ast.Subscript) and _reads_in(target) == 1
            ):
                return None  # `obj.attr = ...`, `obj[k] = ...`: user code (or an envoy setter)
    elif not isinstance(stmt, ast.Expr):
        return None  # (an annotated assignment evaluates its annotation)
    if _reads_in(stmt) != 1:
        return None
    comprehensions = 0
    for node in ast.walk(stmt):
        if isinstance(node, ast.Call):
            func = node.func
            if node.keywords or len(node.args) != 1 or isinstance(node.args[0], ast.Starred):
                return None
            if isinstance(func, ast.Name) and func.id == save_helper:  # `x.save()`, rewritten
                continue
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and (func.value.id, func.attr) in appends:
                continue
            if not (isinstance(func, ast.Attribute) and func.attr == "save" and isinstance(func.value, ast.Name)):
                return None
            if (func.value.id, "save") not in read[2]:
                return None  # (`inline_plan` checks those are `interlace.save` itself)
        elif isinstance(node, ast.ListComp):
            comprehensions += 1
            if read[1][-1:] != (_EACH,) or not _index_chain(node.elt):
                return None
        elif not isinstance(node, _PLAIN_NODES):
            return None
    if comprehensions > 1 or (read[1][-1:] == (_EACH,)) != (comprehensions == 1):
        return None
    return read


def _reads_in(node: ast.AST) -> int:
    return sum(isinstance(n, ast.Attribute) and n.attr in _ENVOY_VALUES for n in ast.walk(node))


def _index_chain(elt: ast.AST) -> bool:
    """`item.output` followed only by constant indexes (`item.output[0][:, -1]`).

    The items' outputs are kept as they arrive and the element is evaluated once the last
    one has: plain indexing gives views of the same storage then as it would have earlier.
    """
    while isinstance(elt, ast.Subscript):
        if not _constant_index(elt.slice):
            return False
        elt = elt.value
    return isinstance(elt, ast.Attribute) and elt.attr == "output" and isinstance(elt.value, ast.Name)


def _constant_index(node: ast.AST | None) -> bool:
    if node is None:
        return True
    if isinstance(node, ast.Constant):
        return node.value is None or node.value is Ellipsis or type(node.value) is int
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return isinstance(node.operand, ast.Constant) and type(node.operand.value) is int
    if isinstance(node, ast.Slice):
        return _constant_index(node.lower) and _constant_index(node.upper) and _constant_index(node.step)
    if isinstance(node, ast.Tuple):
        return all(_constant_index(e) for e in node.elts)
    return False


# -- when the run starts ---------------------------------------------------------------------


def _module_at(read: Read, ns: dict[str, Any], model: Host, check: Any = None) -> Any:
    """The module a read's path leads to (a list of modules for a last `("*", 0)` step),
    walked on `model`'s modules, running no code; None if it does not lead through child
    modules from an envoy of `model`, or a call on the way is not a plain module attribute
    (is not `check`, when given). Runs with cold caches before each forward: kept flat."""
    name, steps, module_attrs = read
    for module_name, attr in module_attrs:  # read before the value: must run no code
        loaded = ns.get(module_name)
        if not isinstance(loaded, types.ModuleType) or attr not in loaded.__dict__:
            return None
        if check is not None and loaded.__dict__[attr] is not check:
            return None
    envoy = ns.get(name)
    if not isinstance(envoy, Envoy) or envoy._root is not model:
        return None
    d = model.__dict__
    shadow = d["_shadow"]  # aliases and extra modules: resolved as `NNsight._alias_target` does
    module = envoy._module
    for kind, key in steps:
        children = module._modules
        if kind == "a":
            if key in shadow:
                if module is not model._module or key in d["_root_aliases"] or key not in d["_extra_modules"]:
                    return None
                module = d["_extra_modules"][key]  # `model.generator`
                continue
            module = children.get(key)
            if module is None:
                return None
        elif kind == "i":
            try:
                module = list(children.values())[key]  # as Envoy.__getitem__ picks
            except IndexError:
                return None
        else:  # every child, as iterating the envoy gives them
            each = list(children.values())
            return each if each and None not in each else None
    return module


def _index(model: Host, module: Any) -> int | None:
    index = model.__dict__["_index_map"]
    if index is None or id(module) not in index:
        try:
            return model._module_index(module)  # (re)builds the index, as the run would
        except Exception:
            return None
    return index[id(module)]


def first_read_index(read: Read, ns: dict[str, Any], model: Host) -> int | None:
    """The module index of a body's first read (`Block.first_read`), or None when the read
    cannot be resolved without running code; the body then starts before the forward as usual
    and raises at its own line if the path is wrong."""
    module = _module_at(read, ns, model)
    if isinstance(module, list):
        module = module[0]
    return None if module is None else _index(model, module)


def inline_plan(
    segments: tuple[Segment, ...], ns: dict[str, Any], model: Host, tracer: Any = None
) -> list[tuple[Segment, tuple[int, ...], list[int] | None]] | None:
    """Each inline statement with the module indices it reads, in order, and for a step loop
    its steps; None if a read does not resolve (the body then runs on a greenlet)."""
    plan: list[tuple[Segment, tuple[int, ...], list[int] | None]] = []
    for segment in segments:
        read = segment.read
        if read is None:  # an empty accumulator: its constructor must be the builtin
            builtins = ns.get("__builtins__")
            for name in segment.constructors:
                found = ns[name] if name in ns else builtins.get(name) if isinstance(builtins, dict) else None
                if found is not _CONSTRUCTORS[name]:
                    return None
            plan.append((segment, (), None))
            continue
        module = _module_at(read, ns, model, save)
        if module is None:
            return None
        if type(module) is list:
            indices = tuple([_index(model, m) for m in module])
            if None in indices:
                return None
        else:
            idx = _index(model, module)
            if idx is None:
                return None
            indices = (idx,)
        steps = None
        if segment.loop is not None:
            name, key, _ = segment.loop
            if tracer is None or ns.get(name) is not tracer or indices[0] in model.__dict__.get("_unstepped", ()):
                return None  # (an unstepped module, `model.generator`, has one value per run)
            try:
                loop = tracer.all() if key == ALL_STEPS else tracer.iter[key]
            except Exception:  # a bad key: the loop raises its error on a greenlet
                return None
            steps = list(loop.steps)
            if steps and steps[-1] >= loop.limit and tracer.kind != "generate":
                # A step past the run's end never comes; only generation's "ended early"
                # can end an inline loop midway (`Interleaver._throw`), so leave it to a greenlet.
                return None
        plan.append((segment, indices, steps))
    return plan
