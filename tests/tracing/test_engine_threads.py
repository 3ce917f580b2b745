"""Traces in several threads at once (separate models), and a module called twice per forward."""

from __future__ import annotations

import threading

import torch

import interlace
from interlace.models.demo import build_tiny_mlp
from engine_helpers import Twice


def test_traces_in_parallel_threads_stay_separate() -> None:
    results: dict[int, bool] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            mlp = build_tiny_mlp(seed=k)
            model = interlace.NNsight(mlp)
            x = torch.rand(3, 5, generator=torch.Generator().manual_seed(k))
            ok = True
            for i in range(40):
                with model.trace(x):
                    model.layer1.output = model.layer1.output * (i % 3)
                    out = model.output.save()
                with torch.no_grad():
                    expected = mlp.layer2(mlp.act(mlp.layer1(x) * (i % 3)))
                ok = ok and torch.equal(out, expected)
                try:
                    with model.trace(x):
                        model.layer2.output
                        model.layer1.output
                except interlace.OutOfOrderError:
                    pass
                else:
                    ok = False
            results[k] = ok
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == {0: True, 1: True, 2: True, 3: True}


def test_module_called_twice_next_addresses_the_second_call(tiny_input: torch.Tensor) -> None:
    inner = Twice(5)
    model = interlace.NNsight(inner)
    with model.trace(tiny_input):
        first = model.lin.output.save()
        second = model.lin.next().output.save()
    with torch.no_grad():
        assert torch.equal(first, inner.lin(tiny_input))
        assert torch.equal(second, inner(tiny_input))
    with model.trace(tiny_input):
        model.lin.output = model.lin.output * 0  # edits the first call only
        out = model.output.save()
    with torch.no_grad():
        assert torch.equal(out, inner.lin(torch.zeros(1, 5)))
