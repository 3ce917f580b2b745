"""Bodies made only of inline statements run without a greenlet (`reads.body_segments`,
`Interleaver.run_inline`): each statement runs in the wrapper that serves its last value.

Nothing a user can see may differ from the same body on a greenlet: every case here runs
both ways and compares values, edits, errors and the lines errors point at.
"""

from __future__ import annotations

import traceback
from typing import Any, Callable

import pytest
import torch

import interlace
from interlace.tracing import interleaver as interleaver_module
from interlace.tracing import tracer as tracer_module
from interlace.tracing.unsaved import NotSaved
from engine_helpers import line_of

THIS_FILE = __file__




def _outcome(run: Callable[[], Any]) -> tuple[str, Any]:
    """("ok", values) or ("error", (type, message, user lines in this file))."""
    try:
        return "ok", run()
    except Exception as error:
        lines = [f.lineno for f in traceback.extract_tb(error.__traceback__) if f.filename == THIS_FILE]
        return "error", (type(error), str(error), lines)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _both_ways(monkeypatch: pytest.MonkeyPatch, run: Callable[[], Any]) -> tuple[str, Any]:
    """The outcome of `run` with inline bodies, checked equal to the same on greenlets;
    also checks the inline run put no body on a greenlet. A body that reads one value runs
    with no interleaver (`inline.run_one_read`); it is also run through the interleaver's
    inline path, which must agree too."""
    workers: list[object] = []
    original = interleaver_module._take_worker

    def counting(main: Any) -> Any:
        workers.append(main)
        return original(main)

    monkeypatch.setattr(interleaver_module, "_take_worker", counting)
    inline = _outcome(run)
    inline_workers = len(workers)
    monkeypatch.setattr(tracer_module, "run_one_read", lambda *args: None)  # "not applicable"
    through_interleaver = _outcome(run)
    assert len(workers) == inline_workers or inline[0] == "error"
    monkeypatch.setattr(tracer_module, "inline_plan", lambda *args: None)
    on_greenlet = _outcome(run)
    monkeypatch.undo()
    for other in (through_interleaver, on_greenlet):
        assert inline[0] == other[0], (inline, other)
        if inline[0] == "ok":
            assert _same(inline[1], other[1])
        else:
            assert inline[1] == other[1]
    if inline[0] == "ok":
        assert inline_workers == 0  # no body went on a greenlet
    assert len(workers) > inline_workers  # the last run did use greenlets
    return inline


def _interleavers_made(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """A list that grows by one for every interleaver made from now on."""
    made: list[object] = []
    original = interleaver_module.Interleaver.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(interleaver_module.Interleaver, "__init__", init)
    return made


def test_reads_edits_and_saves_match_greenlet_bodies(gpt2: interlace.LanguageModel, monkeypatch: pytest.MonkeyPatch) -> None:
    prompt = "The Eiffel Tower is in"

    def one_read() -> Any:
        with gpt2.trace(prompt):
            logits = gpt2.lm_head.output.save()
        return logits

    def edit_then_read() -> Any:
        with gpt2.trace(prompt):
            gpt2.transformer.h[1].output[0][:] = 0
            last = (gpt2.transformer.ln_f.output[:, -1] * 2).save()
            logits = gpt2.lm_head.output.save()
        return logits, last

    def every_block() -> Any:
        with gpt2.trace(prompt):
            outs = interlace.save([b.output for b in gpt2.transformer.h])
        with gpt2.trace(prompt):
            hidden = interlace.save([b.output[0][..., -1, :] for b in gpt2.transformer.h])
        return outs, hidden

    def same_module_twice() -> Any:
        with gpt2.trace(prompt):
            whole = gpt2.transformer.h[2].output.save()
            first = gpt2.transformer.h[2].output[0].save()
        return whole, first

    def unsaved_names_stay_inside() -> Any:
        with gpt2.trace(prompt):
            h = gpt2.transformer.h[0].output
            logits = gpt2.lm_head.output.save()
        return logits, not isinstance(h, NotSaved)  # (a placeholder: used, it says `h` was not saved)

    def nothing() -> Any:
        with gpt2.trace(prompt) as tracer:
            pass
        return tracer.output.logits

    ok, (logits, last) = _both_ways(monkeypatch, edit_then_read)
    assert ok == "ok" and not _same(logits, _both_ways(monkeypatch, one_read)[1])  # the edit took
    inner, raw_last = gpt2._module, []
    handles = [inner.transformer.h[1].register_forward_hook(lambda m, a, o: torch.zeros_like(o)),
               inner.transformer.ln_f.register_forward_hook(lambda m, a, o: raw_last.append(o[:, -1].detach() * 2))]
    try:
        with torch.no_grad():
            inner(**gpt2.tokenizer(prompt, return_tensors="pt"))
    finally:
        for handle in handles:
            handle.remove()
    assert torch.allclose(last, raw_last[0], atol=1e-5)  # raw hooks doing the same edit
    ok, (outs, hidden) = _both_ways(monkeypatch, every_block)
    assert len(outs) == len(hidden) == 4 and torch.equal(outs[3][0][..., -1, :], hidden[3])
    ok, (whole, first) = _both_ways(monkeypatch, same_module_twice)
    assert torch.equal(first, whole[0])  # the same value served to both statements
    assert _both_ways(monkeypatch, unsaved_names_stay_inside)[1][1] is False
    assert torch.equal(_both_ways(monkeypatch, nothing)[1], _both_ways(monkeypatch, one_read)[1])


def test_errors_are_the_same_and_point_at_the_line(mlp_model: interlace.NNsight, tiny_input: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    def out_of_order() -> Any:
        with mlp_model.trace(tiny_input):
            late = mlp_model.layer2.output.save()
            early = mlp_model.layer1.output.save()  # INLINE-ORDER
        return late, early

    def bad_attribute() -> Any:
        with mlp_model.trace(tiny_input):
            h = mlp_model.layer1.output.no_such_attribute  # INLINE-ATTRIBUTE
        return h

    def bad_index() -> Any:
        with mlp_model.trace(tiny_input):
            outs = interlace.save([m.output[0, 99] for m in mlp_model])  # INLINE-INDEX
        return outs

    for run, marker, error in [
        (out_of_order, "# INLINE-ORDER", interlace.OutOfOrderError),
        (bad_attribute, "# INLINE-ATTRIBUTE", AttributeError),
        (bad_index, "# INLINE-INDEX", IndexError),
    ]:
        kind, (error_type, message, lines) = _both_ways(monkeypatch, run)
        assert kind == "error" and error_type is error and line_of(THIS_FILE, marker) in lines, (marker, message)
    assert f"{THIS_FILE}:{line_of(THIS_FILE, '# INLINE-ORDER')}" in _outcome(out_of_order)[1][1]


class _Stack(torch.nn.Module):
    """Three layers run last to first (`backwards`), or the first two only (`short`)."""

    def __init__(self, backwards: bool = False, short: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(3, 3) for _ in range(3)])
        self.backwards = backwards
        self.short = short

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = list(self.layers)[: 2 if self.short else 3]
        for layer in reversed(layers) if self.backwards else layers:
            x = layer(x)
        return x


def test_a_module_that_never_runs_fails_at_its_line(monkeypatch: pytest.MonkeyPatch) -> None:
    model = interlace.NNsight(_Stack(short=True))
    x = torch.randn(2, 3)

    def every_layer() -> Any:
        with model.trace(x):
            first = model.layers[0].output.save()
            outs = interlace.save([layer.output for layer in model.layers])  # INLINE-NEVER
        return first, outs

    kind, (error_type, message, lines) = _both_ways(monkeypatch, every_layer)
    assert error_type is interlace.ModuleNotCalledError and "model.layers.2" in message
    assert line_of(THIS_FILE, "# INLINE-NEVER") in lines


def test_a_comprehension_over_modules_that_run_out_of_order_raises_at_the_access(monkeypatch: pytest.MonkeyPatch) -> None:
    model = interlace.NNsight(_Stack(backwards=True))
    x = torch.randn(2, 3)

    def every_layer() -> Any:
        with model.trace(x):
            outs = interlace.save([layer.output for layer in model.layers])  # INLINE-REVERSED
        return outs

    kind, (error_type, message, lines) = _both_ways(monkeypatch, every_layer)
    assert error_type is interlace.OutOfOrderError and "model.layers.1" in message
    assert line_of(THIS_FILE, "# INLINE-REVERSED") in lines


def test_generation_reads_the_first_step_inline(gpt2: interlace.LanguageModel, monkeypatch: pytest.MonkeyPatch) -> None:
    def run() -> Any:
        with gpt2.generate("Hello", max_new_tokens=3, do_sample=False) as tracer:
            logits = gpt2.lm_head.output.save()
        return logits, tracer.output

    kind, (logits, ids) = _both_ways(monkeypatch, run)
    with torch.no_grad():
        expected = gpt2._module(ids[:, :-3]).logits  # the prompt's forward is step 0
    assert torch.allclose(logits, expected[:, -logits.shape[1] :], atol=1e-5)


def _values(monkeypatch: pytest.MonkeyPatch, run: Callable[[], Any]) -> Any:
    kind, values = _both_ways(monkeypatch, run)
    assert kind == "ok", values
    return values


def test_step_loops_during_generation_match_greenlet_bodies(gpt2: interlace.LanguageModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """`for step in tracer.iter[...]:` around one statement runs inline, one step per
    generation step, with the loop variable, saves and the tokens the same as on a greenlet."""
    prompt = "The Eiffel Tower is in"

    def logits_each_step() -> Any:
        with gpt2.generate(prompt, max_new_tokens=4, do_sample=False) as tracer:
            logits = list().save()
            for step in tracer.iter[:]:
                logits.append(gpt2.lm_head.output[:, -1])
            ids = gpt2.generator.output.save()
        return logits, ids

    def some_steps() -> Any:
        with gpt2.generate(prompt, max_new_tokens=4, do_sample=False) as tracer:
            chosen = [].save()
            for step in tracer.iter[[0, 2]]:
                chosen.append(gpt2.transformer.h[0].output[:, -1] * (step + 1))
            later = [].save()
            for k in tracer.iter[3:]:  # (a second loop goes on from where the first one ended)
                later.append(gpt2.transformer.h[1].output[:, -1])
        return chosen, later

    def edit_from_step_two() -> Any:
        with gpt2.generate(prompt, max_new_tokens=4, do_sample=False) as tracer:
            for step in tracer.iter[2:]:
                gpt2.transformer.h[1].output[0][:] = 0
            ids = gpt2.generator.output.save()
        return ids

    def every_token() -> Any:
        with gpt2.generate(prompt, max_new_tokens=3, do_sample=False) as tracer:
            tokens = [].save()
            for step in tracer.all():
                tokens.append(gpt2.generator.streamer.output)
        return tokens

    logits, ids = _values(monkeypatch, logits_each_step)
    assert len(logits) == 4
    assert torch.equal(torch.stack(logits, 1).argmax(-1), ids[:, -4:])  # greedy: each step's pick
    chosen, later = _values(monkeypatch, some_steps)
    # The truth: Hugging Face's generate under raw hooks, one output per forward (step).
    raw0, raw1 = _raw_generation_outputs(gpt2, prompt, 4, [0, 1])
    assert len(chosen) == 2 and len(later) == 1
    assert torch.allclose(chosen[0], raw0[0], atol=1e-5) and torch.allclose(chosen[1], raw0[2] * 3, atol=1e-5)
    assert torch.allclose(later[0], raw1[3], atol=1e-5)
    edited = _values(monkeypatch, edit_from_step_two)
    with gpt2.generate(prompt, max_new_tokens=4, do_sample=False):
        plain = gpt2.generator.output.save()
    assert torch.equal(edited[:, :-2], plain[:, :-2]) and not torch.equal(edited, plain)
    tokens = _values(monkeypatch, every_token)
    assert len(tokens) == 3


def _raw_generation_outputs(gpt2: interlace.LanguageModel, prompt: str, steps: int, blocks: list[int]) -> list[list[torch.Tensor]]:
    """Each block's last-position output at every forward of a plain HF generate."""
    outs: list[list[torch.Tensor]] = [[] for _ in blocks]
    handles = [gpt2._module.transformer.h[b].register_forward_hook(
        lambda m, i, o, seen=seen: seen.append(o[:, -1].detach().clone())) for b, seen in zip(blocks, outs)]
    try:
        with torch.no_grad():
            gpt2._module.generate(**gpt2.tokenizer(prompt, return_tensors="pt"), max_new_tokens=steps, do_sample=False)
    finally:
        for h in handles:
            h.remove()
    return outs


def test_a_step_loop_that_generation_ends_early_warns_and_ends_the_body(gpt2: interlace.LanguageModel, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import StoppingCriteria, StoppingCriteriaList

    class AfterThree(StoppingCriteria):
        def __init__(self, prompt_length: int) -> None:
            self.end = prompt_length + 3

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.end, dtype=torch.bool)

    prompt = "The Eiffel Tower is in"
    stop = StoppingCriteriaList([AfterThree(len(gpt2.tokenizer(prompt)["input_ids"]))])

    def run() -> Any:
        with gpt2.generate(prompt, max_new_tokens=6, stopping_criteria=stop, do_sample=False) as tracer:
            seen = list().save()
            after = list().save()
            for step in tracer.iter[:]:
                seen.append(gpt2.lm_head.output)
            after.append(gpt2.generator.output)  # not reached: the loop never finished
        return len(seen), len(after)

    def after_a_read_of_the_same_value() -> Any:
        with gpt2.generate(prompt, max_new_tokens=6, stopping_criteria=stop, do_sample=False) as tracer:
            first = gpt2.lm_head.output.save()
            seen = list().save()
            for step in tracer.iter[:]:  # step 0 is the value just read
                seen.append(gpt2.lm_head.output)
        return len(seen), torch.equal(first, seen[0])

    for body, expected in [(run, (3, 0)), (after_a_read_of_the_same_value, (3, True))]:
        with pytest.warns(interlace.GenerationEndedWarning, match=r"after 3 step\(s\), before step 3") as warned:
            assert _values(monkeypatch, body) == expected
        # inline, through the interleaver's inline path, then on a greenlet
        assert len(warned) == 3 and len({str(w.message) for w in warned}) == 1


def test_step_loops_in_a_trace_and_their_errors(mlp_model: interlace.NNsight, tiny_input: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    def one_step() -> Any:
        with mlp_model.trace(tiny_input) as tracer:
            hs = [].save()
            for step in tracer.iter[:]:
                hs.append(mlp_model.layer1.output + step)
        return hs

    def out_of_order() -> Any:
        with mlp_model.trace(tiny_input) as tracer:
            late = mlp_model.layer2.output.save()
            hs = [].save()
            for step in tracer.iter[0]:
                hs.append(mlp_model.layer1.output)  # INLINE-LOOP-ORDER
        return hs

    def past_the_end() -> Any:
        with mlp_model.trace(tiny_input) as tracer:
            hs = [].save()
            for step in tracer.iter[[0, 3]]:
                hs.append(mlp_model.layer1.output)  # INLINE-LOOP-END
        return hs

    def user_error() -> Any:
        with mlp_model.trace(tiny_input) as tracer:
            hs = [].save()
            for step in tracer.all():
                hs.append(mlp_model.layer1.output[0, 99])  # INLINE-LOOP-RAISE
        return hs

    def only_an_accumulator() -> Any:
        with mlp_model.trace(tiny_input):
            hs = [].save()
        return hs

    def an_empty_loop() -> Any:
        with mlp_model.trace(tiny_input) as tracer:
            hs = [].save()
            for step in tracer.iter[0:0]:
                hs.append(mlp_model.layer1.output)
            out = mlp_model.layer2.output.save()
        return hs, out

    hs = _values(monkeypatch, one_step)
    assert len(hs) == 1
    assert _values(monkeypatch, only_an_accumulator) == []
    hs, out = _values(monkeypatch, an_empty_loop)
    assert hs == [] and torch.equal(out, mlp_model._module(tiny_input))
    for run, marker, error in [
        (out_of_order, "# INLINE-LOOP-ORDER", interlace.OutOfOrderError),
        (user_error, "# INLINE-LOOP-RAISE", IndexError),
    ]:
        kind, (error_type, message, lines) = _both_ways(monkeypatch, run)
        assert kind == "error" and error_type is error and line_of(THIS_FILE, marker) in lines, (marker, message)
    # A step past a trace's end: left to a greenlet, which says the module was not called again.
    with pytest.raises(interlace.ModuleNotCalledError) as info:
        past_the_end()
    assert any(f.lineno == line_of(THIS_FILE, "# INLINE-LOOP-END") for f in traceback.extract_tb(info.value.__traceback__))


def test_statements_that_could_ask_for_more_are_not_inline(mlp_model: interlace.NNsight, tiny_input: torch.Tensor) -> None:
    from interlace.tracing.capture import SAVE_HELPER
    from interlace.tracing.reads import body_segments

    import ast

    def segments(source: str) -> Any:
        body = ast.parse(source).body
        stored = {n.id for n in ast.walk(ast.Module(body=body, type_ignores=[])) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
        return body_segments(body, "<test>", stored, SAVE_HELPER)

    assert segments("a = m.x.output\nb = m.y.output[0][:] \nm.z.output[:] = 0\n") is not None
    assert segments("outs = interlace.save([b.output[0][:, -1] for b in m.layers])") is not None
    assert segments("hs = []\nfor s in t.iter[:]:\n    hs.append(m.x.output[0] * s)\nb = m.y.output") is not None
    assert segments("for s in t.all():\n    m.x.output[:] = 0") is not None
    for source in [
        "a = 0",  # reads nothing and is not an empty list or dict: the body is not inline
        "for s in t.iter[:]:\n    a = m.x.output\n    b = m.y.output",  # one statement per loop
        "for s in t.iter[:]:\n    a = m.x.output\nelse:\n    pass",
        "for s in t.iter[k]:\n    a = m.x.output",  # a key that is not a constant
        "for s in range(3):\n    a = m.x.output",
        "for s in t.iter[:]:\n    a = [b.output for b in m.layers]",  # one value per step
        "for t in t.iter[:]:\n    a = m.x.output",  # the loop rebinds the tracer's name
        "hs.append(m.x.output)",  # not a list this body made: user code
        "hs = []\nhs = []\nhs.append(m.x.output)",  # made twice
        "hs.append(m.x.output)\nhs = []",  # used before it is made
        "hs = {}\nhs.append(m.x.output)",
        "hs = [0]\nhs.append(m.x.output)",  # not empty: `a = 0` above
    ]:
        assert segments(source) is None, source
    for source in [
        "a = f(m.x.output)",  # any call but a save can read more values
        "a = m.x.output.sum()",
        "a = m.x.output + m.y.output",  # two reads in one statement
        "m.x.output = 0",  # an envoy setter
        "d['k'] = m.x.output",  # user __setitem__
        "a = m.x.input",  # not an output read first
        "a = [b.output[i] for b in m.layers]",  # a non-constant index, evaluated late
        "a = [b.output.sum() for b in m.layers]",
        "m = other\na = m.x.output",  # the root is reassigned: resolved wrongly at the start
    ]:
        stored = {"m"} if source.startswith("m = ") else set()
        body = ast.parse(source).body
        assert body_segments(body, "<test>", stored, SAVE_HELPER) is None, source


def test_a_read_hidden_in_a_values_own_save_is_a_clear_error() -> None:
    """The one thing the static check cannot see: a module output whose own `.save()` reads
    another module. On a greenlet that works; inline it cannot wait, so it says how to fix it."""

    class Box:
        def __init__(self, value: torch.Tensor) -> None:
            self.value = value

        def save(self) -> "Box":
            self.later = model.second.output  # reads another module's value
            return interlace.save(self)

    class Boxed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> Box:
            return Box(x)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = Boxed()
            self.second = torch.nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.second(self.first(x).value)

    model = interlace.NNsight(Net())
    x = torch.randn(1, 3)
    with pytest.raises(interlace.TracingError, match=r"model\.second\.output.*`_ = 0`"):
        with model.trace(x):
            box = model.first.output.save()
    with model.trace(x):
        _ = 0
        box = model.first.output.save()
    assert torch.equal(box.later, model._module.second(x))


# -- one read, no interleaver (`inline.run_one_read`) ------------------------------------------


def test_a_body_that_reads_one_value_runs_with_no_interleaver(
    gpt2: interlace.LanguageModel, mlp_model: interlace.NNsight, tiny_input: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt = "The Eiffel Tower is in"
    module = gpt2._module
    hooked: list[torch.Tensor] = []
    handle = module.transformer.h[2].register_forward_hook(lambda m, a, o: hooked.append(o[0] if isinstance(o, tuple) else o))
    try:
        expected_logits = module(**gpt2.tokenizer(prompt, return_tensors="pt")).logits
    finally:
        handle.remove()
    made = _interleavers_made(monkeypatch)
    with gpt2.trace(prompt) as tracer:
        block = gpt2.transformer.h[2].output.save()
    with gpt2.trace(prompt):
        logits = gpt2.lm_head.output.save()
    with mlp_model.trace(tiny_input):
        h = (mlp_model.layer1.output * 2).save()
    assert made == []  # none of these made an interleaver
    assert torch.equal(block if torch.is_tensor(block) else block[0], hooked[0])
    assert torch.equal(logits, expected_logits)
    assert torch.equal(tracer.output.logits, expected_logits)  # the traced call's return value
    assert torch.equal(h, mlp_model._module.layer1(tiny_input) * 2)
    assert "forward" not in gpt2._module.transformer.h[2].__dict__  # the model is left untouched


def test_one_read_is_served_from_the_first_call_of_a_shared_module(monkeypatch: pytest.MonkeyPatch) -> None:
    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layer = torch.nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(self.layer(x))

    model = interlace.NNsight(Twice())
    x = torch.randn(2, 3)

    def first_call() -> Any:
        with model.trace(x):
            h = model.layer.output.save()
        return h

    made = _interleavers_made(monkeypatch)
    assert torch.equal(first_call(), model._module.layer(x))
    assert made == []
    monkeypatch.undo()
    _both_ways(monkeypatch, first_call)


def test_one_read_falls_back_to_the_interleaver_where_it_cannot_apply(
    mlp_model: interlace.NNsight, tiny_input: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module's own instance `forward`, and a subclass whose `_call_model` may use the
    interleaver, take the general path (and still give the right values)."""
    expected = mlp_model._module.layer1(tiny_input)
    made = _interleavers_made(monkeypatch)
    layer = mlp_model._module.layer1
    layer.forward = lambda x, _own=type(layer).forward.__get__(layer): _own(x)  # a user patch
    try:
        with mlp_model.trace(tiny_input):
            h = mlp_model.layer1.output.save()
    finally:
        del layer.forward
    assert torch.equal(h, expected) and len(made) == 1

    seen: list[object] = []

    class OwnCall(interlace.NNsight):
        def _call_model(self, kind: str, args: tuple, kwargs: dict, interleaver: Any) -> Any:
            seen.append(interleaver)
            return super()._call_model(kind, args, kwargs, interleaver)

    own = OwnCall(mlp_model._module)
    with own.trace(tiny_input):
        h = own.layer1.output.save()
    assert torch.equal(h, expected) and len(made) == 2 and seen == [made[1]]


def test_a_module_that_never_runs_fails_at_the_read_without_an_interleaver_too(monkeypatch: pytest.MonkeyPatch) -> None:
    model = interlace.NNsight(_Stack(short=True))
    x = torch.randn(2, 3)

    def last_layer() -> Any:
        with model.trace(x):
            h = model.layers[2].output.save()  # ONE-READ-NEVER
        return h

    kind, (error_type, message, lines) = _both_ways(monkeypatch, last_layer)
    assert error_type is interlace.ModuleNotCalledError and "model.layers.2" in message
    assert line_of(THIS_FILE, "# ONE-READ-NEVER") in lines
