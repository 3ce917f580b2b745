"""Capturing hybrid bodies (`tracing/local_block.py`): `with interlace.local():` blocks, what
each exchanges with the server, the source that travels, a bare `model.all()`, `interlace.list()`,
`tracer.log` and `@interlace.trace`.

The conversation itself (server, worker, HTTP, the client's runner) is tested where it lives;
here: what capture makes of a body, and that a local run gives the same values as a plain one.
"""

from __future__ import annotations

import ast
import textwrap
from typing import Any

import pytest
import torch

import interlace
from engine_helpers import line_of
from interlace.tracing.capture import block_from_source
from interlace.tracing.local_block import LOCAL_HELPER, LOCAL_ONLY_ATTR, List

FILE = "/user/analysis.py"


def _block(body: str, first_lineno: int = 10, head: str = "with model.trace(x) as tracer:") -> Any:
    """The client's Block of `head` + `body` (a plain file name: no shipped-code transform)."""
    return block_from_source(head + "\n" + textwrap.indent(textwrap.dedent(body), "    "), FILE, first_lineno)


# -- detection --------------------------------------------------------------------------------

DETECTED = [
    ("with interlace.local():\n    y = 1\n", [12]),
    ("with tracer.local():\n    y = 1\n", [12]),
    ("with model.local():\n    y = 1\n", [12]),
    ("if c:\n    with interlace.local():\n        y = 1\n", [13]),
    ("for i in range(3):\n    with interlace.local():\n        y = i\n", [13]),
    ("for step in tracer.all():\n    with interlace.local():\n        y = step\n", [13]),
    ("with tracer.invoke('a'):\n    h = 1\n    with interlace.local():\n        y = h\n", [14]),
    ("try:\n    with interlace.local(): y = 1\nexcept ValueError:\n    with interlace.local(): z = 2\n", [13, 15]),
    ("y = local()\nwith other.locals():\n    z = 1\nwith interlace.local(1):\n    z = 2\n", []),
]


@pytest.mark.parametrize("body,lines", DETECTED)
def test_local_blocks_are_found_at_any_depth_by_their_with_line(body: str, lines: list[int]) -> None:
    block = _block("x = 0\n" + body)
    assert [b.line for b in block.local_blocks] == lines
    assert all(b.filename == FILE for b in block.local_blocks)


def test_a_body_without_local_blocks_travels_as_it_is() -> None:
    block = _block("h = model.layer.output.save()\n")
    assert block.local_blocks == ()
    assert block.shipped_source == block.source


# -- what a block exchanges -------------------------------------------------------------------

SPECS = [
    # the seed's ablation: hs comes down, goes back up; the function stays here
    ("hs = model.layers[-1].output[0]\nwith interlace.local():\n    hs = my_local_fn(hs)\nmodel.layers[-1].output[0][:] = hs\n",
     ("hs",), ("hs",)),
    # the live chat: `state` and the decoder are the client's; tokens come down; the model is
    # a name the body uses (the server sends only data)
    ("tokens = model.lm_head.output.argmax(-1).tolist()\nwith interlace.local():\n"
     "    state = decode(tokens[0], model, state=state)\n", ("model", "tokens"), ()),
    # names only the block assigns and uses go nowhere; the tracer is the client's own
    ("with tracer.local():\n    tmp = 3\n    tracer.log(tmp)\n", (), ()),
    # a name the body reads before the block (a later step's loop) is a write
    ("for i in range(2):\n    y = total * 2\n    with interlace.local():\n        total = i\n", ("i",), ("total",)),
    # a comprehension's own variable is not read; a builtin is not a value of the body's
    ("h = 1\nwith interlace.local():\n    out = [h + k for k in range(len(data))]\nsave(out)\n", ("h",), ("out",)),
    # a name a function of the body closes over is used by the body
    ("def f():\n    return g * 2\nwith interlace.local():\n    g = 5\nr = f()\n", (), ("g",)),
    # `x += 1` reads x
    ("n = 0\nwith interlace.local():\n    n += 1\nm = n\n", ("n",), ("n",)),
]


@pytest.mark.parametrize("body,reads,writes", SPECS)
def test_reads_and_writes(body: str, reads: tuple[str, ...], writes: tuple[str, ...]) -> None:
    (block,) = _block(body).local_blocks
    assert (block.reads, block.writes) == (reads, writes)
    assert set(block.writes) <= set(block.assigned)


def test_two_blocks_each_have_their_own_spec() -> None:
    first, second = _block(
        "h = model.out\nwith interlace.local():\n    a = f(h)\nb = a + 1\nwith interlace.local():\n    print(a, b)\n"
    ).local_blocks
    assert (first.reads, first.writes, first.assigned) == (("h",), ("a",), ("a",))
    assert (second.reads, second.writes, second.assigned) == (("a", "b"), (), ())


# -- the shipped source -----------------------------------------------------------------------

SECRET_BODY = """\
h = model.layer.output
with interlace.local():
    import secret_lib
    h = secret_lib.transform(h)   # a comment
    for t in h:
        print(t)
if h is not None:
    with tracer.local(): h = other_secret(h); k = 2
model.layer.output[:] = h
"""


def test_the_shipped_source_keeps_every_line_and_none_of_the_blocks_code() -> None:
    block = _block(SECRET_BODY, first_lineno=40)
    shipped = block.shipped_source
    for word in ("secret_lib", "other_secret", "print", "comment", "k = 2"):
        assert word not in shipped
    original, sent = block.source.splitlines(), shipped.splitlines()
    assert len(original) == len(sent)
    for i in (0, 1, 2, 7, 9):  # the lines outside the blocks, the blocks' `with` lines
        assert sent[i] == original[i]
    assert sent[3] == "        pass" and sent[8] == "        with tracer.local(): pass"
    assert sent[4:7] == ["", "", ""]
    # The server's body has the user's line numbers
    tree = ast.parse(shipped)
    assert [s.lineno for s in tree.body[0].body] == [2, 3, 8, 10]


def test_shipped_code_compiles_each_block_to_the_helper_call() -> None:
    import interlace.execution.run  # noqa: F401 - registers the shipped-code transform

    from interlace.contract.code.origin import remote_filename

    block = _block(SECRET_BODY, first_lineno=40)
    server = block_from_source(block.shipped_source, remote_filename(FILE), 40)
    text = ast.unparse(ast.Module(body=list(server.statements), type_ignores=[]))
    assert f"{LOCAL_HELPER}(42)" in text and f"{LOCAL_HELPER}(48)" in text
    assert "local" not in text.replace(LOCAL_HELPER, "")
    # Run here, the `with` stays: `interlace.local()` is a context manager that does nothing
    local_text = ast.unparse(ast.Module(body=list(block.statements), type_ignores=[]))
    assert "with interlace.local():" in local_text and LOCAL_HELPER not in local_text


def test_a_blocks_code_is_compiled_under_the_users_file_and_lines() -> None:
    (code,) = _block("h = 1\nwith interlace.local():\n    a = 1\n    raise ValueError(a)\n", first_lineno=20).local_blocks
    assert code.code.co_filename == FILE
    with pytest.raises(ValueError) as info:
        exec(code.code, {})
    import traceback

    last = traceback.extract_tb(info.tb)[-1]
    assert (last.filename, last.lineno) == (FILE, 24)


# -- refusals ---------------------------------------------------------------------------------

REFUSED = [
    ("def f(h):\n    with interlace.local():\n        h = 2\n    return h\n", "inside a function or class"),
    ("class C:\n    with interlace.local():\n        a = 1\n", "inside a function or class"),
    ("with interlace.local():\n    with tracer.local():\n        a = 1\n", "inside another local block"),
    ("with interlace.local() as x:\n    a = 1\n", "binds nothing"),
    ("with interlace.local(), torch.no_grad():\n    a = 1\n", "only item"),
    ("for i in range(3):\n    with interlace.local():\n        break\n", "`break` inside a local block"),
    ("with interlace.local():\n    yield 1\n", "cannot run inside a local block"),
]


@pytest.mark.parametrize("body,message", REFUSED)
def test_unsupported_local_blocks_are_refused_with_the_fix(body: str, message: str) -> None:
    with pytest.raises(interlace.TracingError, match=message) as info:
        _block(body)
    assert f"{FILE}:" in str(info.value)


def test_a_loop_inside_a_block_may_break() -> None:
    (code,) = _block("with interlace.local():\n    for i in range(3):\n        break\n").local_blocks
    assert code.line == 11


# -- the face ---------------------------------------------------------------------------------


def test_interlace_list_appends_return_the_list() -> None:
    tokens = interlace.list()
    assert tokens.append(1).append(2).extend([3]) is tokens and tokens == [1, 2, 3]
    assert isinstance(tokens, list) and type(tokens) is List
    ns: dict[str, Any] = {}
    exec("from interlace import *", ns)
    assert ns.get("list", list) is list  # a star import keeps the built-in
    from interlace.contract.guard import body_api

    assert body_api().list is List and body_api().local is interlace.local


def test_trace_marks_and_returns_the_function() -> None:
    def fn(x: int) -> int:
        return x + 1

    assert interlace.trace(fn) is fn and fn(1) == 2 and getattr(fn, LOCAL_ONLY_ATTR) is True
    with pytest.raises(TypeError, match="@interlace.trace marks functions"):
        interlace.trace(3)  # type: ignore[arg-type]


def test_local_outside_a_trace_does_nothing() -> None:
    with interlace.local():
        x = 1
    assert x == 1


# -- running here (remote=False) --------------------------------------------------------------


@interlace.trace
def ablate(value: torch.Tensor) -> torch.Tensor:
    return value * 0


def test_a_local_block_run_here_gives_the_values_of_the_plain_body(gpt2: interlace.LanguageModel) -> None:
    with gpt2.trace("The Eiffel Tower is in"):
        hs = gpt2.transformer.h[-1].output[0]
        mean = hs.mean()
        with interlace.local():
            hs = ablate(hs) + mean
            seen = interlace.save(list(hs.shape))
        gpt2.transformer.h[-1].output[0][:] = hs
        out = gpt2.lm_head.output.save()
    with gpt2.trace("The Eiffel Tower is in"):
        hs = gpt2.transformer.h[-1].output[0]
        mean = hs.mean()
        hs = ablate(hs) + mean
        shape = interlace.save(list(hs.shape))
        gpt2.transformer.h[-1].output[0][:] = hs
        plain = gpt2.lm_head.output.save()
    with gpt2.trace("The Eiffel Tower is in"):
        clean = gpt2.lm_head.output.save()
    assert torch.equal(out, plain) and not torch.equal(out, clean)
    assert seen == shape


def test_tracer_log_prints_here(gpt2: interlace.LanguageModel, capsys: pytest.CaptureFixture[str]) -> None:
    with gpt2.trace("Hello") as tracer:
        h = gpt2.transformer.h[0].output[0]
        tracer.log("first", h.shape[-1], sep="|")
        with tracer.local():
            tracer.log("inside", end="!")
    assert capsys.readouterr().out == "first|128\ninside!\n"
    lines: list[str] = []
    tracer.set_log_line(lines.append)
    tracer.log("a", 1)
    assert lines == ["a 1"]


# -- a bare `model.all()` ---------------------------------------------------------------------

PROMPT = "The Eiffel Tower is in"
STEPS = 4


def _raw_logits(gpt2: interlace.LanguageModel) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The truth: Hugging Face's own generate under a raw hook, the last position's logits of
    every forward (one per step), and the generated ids."""
    seen: list[torch.Tensor] = []
    handle = gpt2._module.lm_head.register_forward_hook(lambda m, i, o: seen.append(o[:, -1].detach().clone()))
    try:
        with torch.no_grad():
            ids = gpt2._module.generate(**gpt2.tokenizer(PROMPT, return_tensors="pt"), max_new_tokens=STEPS, do_sample=False)
    finally:
        handle.remove()
    return seen, ids


@pytest.mark.parametrize("remote", [False, "local"])
def test_a_bare_all_runs_the_rest_of_the_body_at_every_step(gpt2: interlace.LanguageModel, remote: Any) -> None:
    truth, ids = _raw_logits(gpt2)
    assert len(truth) == STEPS

    with gpt2.generate(PROMPT, max_new_tokens=STEPS, do_sample=False, remote=remote):
        gpt2.all()
        logits = interlace.save([])
        picks = interlace.save([])
        last = gpt2.lm_head.output[:, -1]
        logits.append(last)
        picks.append(last.argmax(-1))
    with gpt2.generate(PROMPT, max_new_tokens=STEPS, do_sample=False, remote=remote) as tracer:
        looped = interlace.save([])
        for step in tracer.all():
            looped.append(gpt2.lm_head.output[:, -1])
    with gpt2.generate(PROMPT, max_new_tokens=STEPS, do_sample=False, remote=remote) as tracer:
        tracer.all()
        by_tracer = [].save()
        by_tracer.append(gpt2.lm_head.output[:, -1])

    assert len(logits) == len(looped) == len(by_tracer) == STEPS
    for ours, loop, other, raw in zip(logits, looped, by_tracer, truth):
        assert torch.equal(ours, loop) and torch.equal(ours, other)
        assert torch.allclose(ours, raw, atol=1e-5)
    assert torch.cat(picks).tolist() == ids[0, -STEPS:].tolist()


def test_a_bare_all_makes_the_lists_after_it_once(gpt2: interlace.LanguageModel) -> None:
    """The seed's spelling: `llama.all()`, then `all_tokens = interlace.list().save()` (made
    once, before the loop), then `all_tokens.append(token).save()` at every step."""
    with gpt2.generate(PROMPT, max_new_tokens=STEPS, do_sample=False) as generator:
        gpt2.all()
        all_tokens = interlace.list().save()
        out = gpt2.lm_head.output.save()
        tokens = torch.max(torch.nn.functional.softmax(out, dim=-1), dim=-1).indices.cpu().tolist()
        all_tokens.append(tokens[0][-1]).save()
        with interlace.local():
            count = len(all_tokens)
            counts = interlace.save([]) if count == 1 else counts
            counts.append(count)
    assert type(all_tokens) is List
    assert all_tokens == generator.output[0, -STEPS:].tolist()
    assert counts == [1, 2, 3, 4]  # the block ran at every step, after that step's append


def test_a_bare_all_on_something_else_says_what_it_needs(gpt2: interlace.LanguageModel) -> None:
    with pytest.raises(interlace.TracingError, match="must be the model or the tracer, not a Tensor"):
        with gpt2.generate(PROMPT, max_new_tokens=2):
            flags = torch.ones(2)
            flags.all()
            h = gpt2.lm_head.output.save()


def test_model_all_outside_a_run_says_where_it_works(gpt2: interlace.LanguageModel) -> None:
    with pytest.raises(interlace.TracingError, match="inside a traced body while the model runs"):
        gpt2.all()


# -- `@interlace.trace` refused outside a local block -----------------------------------------


def test_a_local_only_function_outside_a_block_is_refused_before_sending(gpt2: interlace.LanguageModel) -> None:
    with pytest.raises(interlace.RemoteValidationError) as info:
        with gpt2.trace("hello", remote="local"):
            hs = gpt2.transformer.h[-1].output[0]
            hs = ablate(hs)  # no local block
            gpt2.transformer.h[-1].output[0][:] = hs
            out = gpt2.lm_head.output.save()
    (problem,) = [p for p in info.value.problems if p.category == "local-only-function"]
    assert "`ablate` is marked @interlace.trace" in problem.message
    assert problem.fix == "with interlace.local():\n    hs = ablate(hs)"
    assert (problem.filename, problem.lineno) == (__file__, line_of(__file__, "# no local block"))


def test_names_only_blocks_use_are_neither_sent_nor_checked(gpt2: interlace.LanguageModel) -> None:
    """`ablate` (local-only), `open` (refused on a server) and an unsendable object used only
    inside the block never reach the request."""
    import threading

    from interlace.backends.outbound import build_request
    from interlace.tracing.backend import CapturedTrace

    lock = threading.Lock()  # cannot be sent
    captured: list[Any] = []

    def capture(trace: CapturedTrace) -> dict[str, Any]:
        captured.append(build_request(trace, "tiny"))
        return {}

    with gpt2.trace("hello", backend=capture):
        hs = gpt2.transformer.h[-1].output[0]
        with interlace.local():
            with lock:
                hs = ablate(hs)
            print(open)
        gpt2.transformer.h[-1].output[0][:] = hs
    (built,) = captured
    request = built.request
    assert built.problems == []
    assert set(request.variables) | set(request.model_refs) == {"gpt2", "interlace"}
    assert "ablate" not in request.block.source and "lock" not in request.block.source
    (spec,) = request.local_blocks
    assert (spec.reads, spec.writes) == (("hs",), ("hs",))
