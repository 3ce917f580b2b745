"""Lazy runs: after a model's first traced run records its call order (an OrderTable), later
runs wrap only the root and the modules bodies ask for. Values, step addressing and the
OutOfOrderError at the access must not change."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import interlace
from engine_helpers import Twice, line_of

THIS_FILE = __file__

# These tests are about bodies that run on a greenlet; bodies made only of inline statements
# bypass what they check (see test_engine_inline.py).
pytestmark = pytest.mark.usefixtures("greenlet_bodies")


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(4, 4)
        self.act = torch.nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.inner(x))


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([_Block() for _ in range(3)])
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class _Swappable(torch.nn.Module):
    """Calls `a` then `b`, or `b` then `a` when `flip` is set: a call order that changes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)
        self.flip = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip:
            return self.b(x) + self.a(x)
        return self.a(x) + self.b(x)


def _a_and_b_in_two_invokes(model: interlace.NNsight, x: torch.Tensor) -> tuple[Any, Any]:
    """One call site reading `_Swappable`'s two layers, one per invoke."""
    with model.trace() as tracer:
        with tracer.invoke(x):
            a = model.a.output.save()
        with tracer.invoke(x):
            b = model.b.output.save()
    return a, b




def _run_all(model: interlace.NNsight, x: torch.Tensor) -> tuple[Any, ...]:
    with model.trace(x):
        inner1 = model.blocks[1].inner.output.save()
        block1 = model.blocks[1].output.save()  # the block is running when inner1 is served
        model.blocks[2].inner.output[:] = 0
        head_in = model.head.input.save()
        out = model.output.save()
        running = model.__dict__["_active"]
        wrapped = interlace.save(len(running.wrapped) if running.lazy is not None else None)  # None: all wrapped
    return inner1, block1, head_in, out, wrapped


def test_later_runs_wrap_only_what_is_asked_and_give_the_same_values() -> None:
    net = _Net()
    model = interlace.NNsight(net)
    x = torch.randn(2, 4)
    first = _run_all(model, x)
    table = model.__dict__["_order"]
    assert table is not None and table.once and table.valid
    assert first[-1] is None  # the first run wraps every module (and records the table)
    for _ in range(3):
        again = _run_all(model, x)
        assert all(torch.equal(a, b) for a, b in zip(first[:-1], again[:-1]))
        assert again[-1] < len(model.__dict__["_modules_list"])  # root + asked modules (+ callers)
    with torch.no_grad():
        h = net.blocks[0](x)
        inner1 = net.blocks[1].inner(h)
        block1 = net.blocks[1](h)
        expected = net.head(block1 + net.blocks[2].act(torch.zeros_like(block1)))
    assert torch.equal(first[0], inner1) and torch.equal(first[1], block1)
    assert torch.equal(first[3], expected)
    assert all("forward" not in m.__dict__ for m in net.modules())  # nothing left installed


def test_lazy_run_raises_out_of_order_at_the_access() -> None:
    net = _Net()
    model = interlace.NNsight(net)
    x = torch.randn(1, 4)
    with model.trace(x):
        pass
    assert model.__dict__["_order"].once
    calls = []
    handle = net.head.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(interlace.OutOfOrderError) as info:
            with model.trace(x):
                late = model.blocks[2].output.save()
                early = model.blocks[0].inner.output  # LAZY-OUT-OF-ORDER
    finally:
        handle.remove()
    assert calls == []  # the forward stopped where the error surfaced
    message = str(info.value)
    assert "model.blocks.0.inner" in message
    assert f"{THIS_FILE}:{line_of(THIS_FILE, '# LAZY-OUT-OF-ORDER')}" in message
    with pytest.raises(interlace.OutOfOrderError, match=r"model\.blocks\.1\.input"):
        with model.trace(x):
            model.blocks[1].output
            model.blocks[1].input
    with pytest.raises(interlace.OutOfOrderError, match=r"model\.blocks\.1\.inner\.output"):
        with model.trace(x):
            model.blocks[1].output  # never wrapped before: its sub-module ran inside it
            model.blocks[1].inner.output
    # In order is still fine afterwards, and the table was not thrown away by the errors.
    with model.trace(x):
        a = model.blocks[0].inner.input.save()
        b = model.blocks[2].output.save()
    assert torch.equal(a, x)
    assert model.__dict__["_order"] is not None and model.__dict__["_order"].valid


def test_generation_steps_stay_right_in_lazy_runs(gpt2: interlace.LanguageModel) -> None:
    gpt2.__dict__["_order"] = None  # the first run below records, the others are lazy

    lazy: list[bool] = []

    def run() -> tuple[Any, Any, Any]:
        with gpt2.generate("Hello", max_new_tokens=3, do_sample=False) as tracer:
            toks = interlace.save([])
            hidden = interlace.save([])
            second = interlace.save([])
            for step in tracer.iter[:]:
                if step == 1:
                    second.append(gpt2.transformer.h[0].mlp.output)
                h1 = gpt2.transformer.h[1].output
                h1 = h1[0] if isinstance(h1, tuple) else h1
                hidden.append(h1[:, -1].clone())
                toks.append(gpt2.lm_head.output.argmax(-1)[:, -1])
            out = gpt2.generator.output.save()
            lazy.append(gpt2.__dict__["_active"].lazy is not None)
        return torch.stack(toks, 1), torch.stack(hidden, 1), (second[0], out)

    first = run()
    assert gpt2.__dict__["_order"] is not None and gpt2.__dict__["_order"].once
    for _ in range(2):
        again = run()
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
        assert torch.equal(first[2][0], again[2][0]) and torch.equal(first[2][1], again[2][1])
    assert first[0].shape[1] == 3
    assert torch.equal(first[2][1][:, -3:], first[0])
    assert gpt2.__dict__["_order"].valid
    assert lazy == [False, True, True]


def test_a_module_called_twice_keeps_full_wrapping() -> None:
    net = Twice(4)
    model = interlace.NNsight(net)
    x = torch.randn(1, 4)
    for _ in range(3):
        with model.trace(x):
            first = model.lin.output.save()
            second = model.lin.next().output.save()
            lazy = interlace.save(model.__dict__["_active"].lazy is not None)
        assert not lazy
        with torch.no_grad():
            assert torch.equal(first, net.lin(x)) and torch.equal(second, net(x))
    table = model.__dict__["_order"]
    assert table is not None and not table.once


def test_a_changed_call_order_invalidates_the_table() -> None:
    net = _Swappable()
    model = interlace.NNsight(net)
    x = torch.randn(1, 4)

    def run() -> tuple[Any, Any]:
        return _a_and_b_in_two_invokes(model, x)

    run()
    table = model.__dict__["_order"]
    assert table.start[1] < table.start[2]  # a before b
    net.flip = True
    a, b = run()  # lazy: a and b start out of the table's order
    with torch.no_grad():
        assert torch.allclose(a, net.a(x)) and torch.allclose(b, net.b(x))
    assert not table.valid
    run()  # wraps everything and records the new order
    new = model.__dict__["_order"]
    assert new is not table and new.valid and new.start[2] < new.start[1]
    a2, b2 = run()
    assert torch.equal(a, a2) and torch.equal(b, b2)


def test_a_new_module_index_drops_the_table() -> None:
    model = interlace.NNsight(_Net())
    with model.trace(torch.randn(1, 4)):
        pass
    assert model.__dict__["_order"] is not None
    model._rebuild_index()
    assert model.__dict__["_order"] is None


def test_cache_in_a_lazy_run_sees_every_module() -> None:
    model = interlace.NNsight(_Net())
    x = torch.randn(1, 4)
    caches = []
    for _ in range(2):
        with model.trace(x) as tracer:
            cache = tracer.cache()
            h = model.blocks[0].output.save()
        caches.append(cache)
    assert set(caches[0]) == set(caches[1]) and "model.blocks.2.inner" in caches[1]
    # Both runs (recording, then lazy) equal raw forward hooks, not merely each other.
    raw: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, a, o, name=name: raw.__setitem__(f"model.{name}", o.detach().clone()))
               for name, m in model._module.named_modules() if name]
    try:
        model._module(x)
    finally:
        for h in handles:
            h.remove()
    for cache in caches:
        assert all(torch.equal(cache[k].output, raw[k]) for k in raw if k in cache) and set(raw) <= set(cache)


def test_a_call_site_asking_for_different_modules_each_run_stays_right() -> None:
    net = _Net()
    model = interlace.NNsight(net)
    x = torch.randn(2, 4)
    with torch.no_grad():
        expected = []
        h = x
        for b in net.blocks:
            expected.append((b.inner(h), b(h)))
            h = b(h)

    def run(layer: int) -> tuple[Any, Any]:
        with model.trace(x):
            inner = model.blocks[layer].inner.output.save()
            block = model.blocks[layer].output.save()
        return inner, block

    # The first runs record the table and remember what this call site wrapped; later ones
    # wrap it before the forward (OrderTable.ahead) and still wrap new requests mid-run.
    for layer in (0, 2, 1, 2, 0, 1):
        inner, block = run(layer)
        assert torch.equal(inner, expected[layer][0]) and torch.equal(block, expected[layer][1])
    table = model.__dict__["_order"]
    assert table.valid and table.ahead  # the memo holds this call site


def test_a_remembered_call_site_gives_right_values_after_the_order_changes() -> None:
    net = _Swappable()
    model = interlace.NNsight(net)
    x = torch.randn(1, 4)

    def run() -> tuple[Any, Any]:
        return _a_and_b_in_two_invokes(model, x)

    for _ in range(3):  # record, wrap mid-run (remembered), then wrap a and b upfront
        run()
    table = model.__dict__["_order"]
    net.flip = True
    a, b = run()  # upfront-wrapped modules count from zero: right whatever the order
    with torch.no_grad():
        assert torch.allclose(a, net.a(x)) and torch.allclose(b, net.b(x))
    assert not table.valid  # and the run's check saw the new order

    with model.trace(x):  # another call site, in the new order: records a new table
        b2 = model.b.output.save()
        a2 = model.a.output.save()
    assert torch.allclose(a2, a) and torch.allclose(b2, b)
    new = model.__dict__["_order"]
    assert new is not table and new.valid and new.start[2] < new.start[1]
