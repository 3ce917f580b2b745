"""Layer 2 of the sandbox under `remote='local'`: real attempts that would escape without a guard
(each refused), and the research idioms the guards must keep working."""

from __future__ import annotations

import operator

import pytest
import torch

import interlace
from interlace.contract.guard import JobGuards, guard_module, module_proxy
from interlace.contract.guard.access import AccessRefused, JobLimitExceeded
from interlace.contract.policy import DEFAULT_POLICY, Policy

PROMPT = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module")
def model(tiny_gpt2_path):
    return interlace.LanguageModel(str(tiny_gpt2_path))




# -- class factories: a namespace with protocol dunders is a `copy.deepcopy` gadget ------------


def test_a_class_built_with_a_reduce_gadget_is_refused_and_linear_stays_intact(model):
    # Without the guard, deepcopy obeys `__reduce_ex__` and sets `forward` on torch.nn.Linear
    # itself: every later job's linear layers would return zeros.
    forward = torch.nn.Linear.forward
    with pytest.raises(interlace.RemoteException) as info:
        with model.trace(PROMPT, remote="local"):
            import copy

            target = torch.nn.Linear

            def red(self, proto):
                return (lambda: target, (), (None, {"forward": lambda self, x: x * 0}))

            G = type("G", (), {"__reduce" + "_ex__": red})
            copy.deepcopy(G())
    assert "__reduce_ex__" in str(info.value)
    assert torch.nn.Linear.forward is forward


def test_a_metaclass_reached_through_type_checks_the_namespace_too(model):
    with pytest.raises(interlace.RemoteException, match="may not define"):
        with model.trace(PROMPT, remote="local"):
            M = type(torch.nn.Linear)
            G = M("G", (), {"__deep" + "copy__": 1})


def test_a_metaclass_reached_through_a_module_checks_the_namespace_too(model):
    with pytest.raises(interlace.RemoteException, match="may not define"):
        with model.trace(PROMPT, remote="local"):
            import abc

            G = abc.ABCMeta("G", (), {"__set" + "state__": 1})


def test_type_still_answers_what_research_code_asks(model):
    with model.trace(PROMPT, remote="local"):
        facts = interlace.save((type(1) is int, isinstance(int, type), issubclass(bool, int),
                                type(model.lm_head.output) is torch.Tensor,
                                type("Point", (), {"x": 1, "__init__": lambda self: None})().x))
    assert facts == (True, True, True, True, 1)


def test_empty_gives_zeros_and_resize_is_refused(model):
    # `torch.empty` hands out memory as it was left: on a server, an earlier job's values.
    with model.trace(PROMPT, remote="local"):
        made = interlace.save([torch.empty(3, 4).abs().sum().item(), torch.empty_like(model.lm_head.output).abs().sum().item()])
    assert made == [0.0, 0.0]
    with pytest.raises(interlace.RemoteException, match="resize_"):
        with model.trace(PROMPT, remote="local"):
            t = torch.zeros(1)
            grown = getattr(t, "resi" + "ze_")(1000)


# -- escapes with names built at run time (the validator cannot see them) ----------------------


def test_getattr_with_a_built_dunder_name_is_refused(model):
    with pytest.raises(interlace.RemoteException) as info:
        with model.trace(PROMPT, remote="local"):
            cls = getattr(model, "__cl" + "ass__")
            h = model.lm_head.output.save()
    assert "AccessRefused" in str(info.value) and "__class__" in str(info.value)


def test_a_generators_frame_is_refused(model):
    name = "gi_" + "frame"
    with pytest.raises(interlace.RemoteException) as info:
        with model.trace(PROMPT, remote="local"):
            gen = (i for i in range(3))
            frame = getattr(gen, name)
            h = model.lm_head.output.save()
    assert "gi_frame" in str(info.value)


def test_format_strings_cannot_reach_attributes(model):
    fmt = "{0.__class__}"
    method = "for" + "mat"
    with pytest.raises(interlace.RemoteException) as info:
        with model.trace(PROMPT, remote="local"):
            text = getattr(fmt, method)(model)
            h = model.lm_head.output.save()
    assert "f-string" in str(info.value)


def test_operator_attrgetter_is_not_in_the_operator_module(model):
    with pytest.raises(interlace.RemoteException) as info:
        with model.trace(PROMPT, remote="local"):
            get = operator.attrgetter("__class__")
            h = model.lm_head.output.save()
    assert "operator.attrgetter" in str(info.value)


def test_torch_load_and_numpy_fromfile_are_absent(model):
    import numpy as np

    for body in ("torch", "np"):
        with pytest.raises(interlace.RemoteException) as info:
            with model.trace(PROMPT, remote="local"):
                if body == "torch":
                    f = getattr(torch, "lo" + "ad")
                else:
                    f = getattr(np, "from" + "file")
                h = model.lm_head.output.save()
        assert "not available" in str(info.value)


def test_a_library_modules_globals_stay_out_of_reach(model):
    with pytest.raises(interlace.RemoteException) as info:
        with model.trace(PROMPT, remote="local"):
            inner = getattr(torch.nn.functional, "tor" + "ch")
            h = model.lm_head.output.save()
    assert "torch.nn.functional.torch" in str(info.value)


def test_a_library_class_cannot_be_patched_for_the_next_job(model):
    name = "for" + "ward"
    with pytest.raises(interlace.RemoteException) as info:
        with model.trace(PROMPT, remote="local"):
            setattr(torch.nn.Linear, name, lambda self, x: x)
            h = model.lm_head.output.save()
    assert "cannot be changed" in str(info.value)
    assert torch.nn.Linear.forward.__qualname__ == "Linear.forward"


def test_the_hosted_models_weights_cannot_be_written(model):
    name = "da" + "ta"
    before = model.lm_head.weight.detach().clone()
    with pytest.raises(interlace.RemoteException) as info:
        with model.trace(PROMPT, remote="local"):
            w = getattr(model.lm_head.weight, name)
            h = model.lm_head.output.save()
    assert info.value.category == "model-modified"
    torch.testing.assert_close(model.lm_head.weight.detach(), before)


def test_module_methods_that_change_the_shared_model_are_refused(model):
    name = "tr" + "ain"
    with pytest.raises(interlace.RemoteException):
        with model.trace(PROMPT, remote="local"):
            getattr(model.transformer, name)()
            h = model.lm_head.output.save()
    assert not model._module.training


def test_numpy_of_a_tensor_is_a_copy(model):
    with model.trace(PROMPT, remote="local"):
        arr = model.lm_head.output.numpy()
        arr[:] = 0
        out = model.lm_head.output.save()
    assert float(out.abs().sum()) > 0


# -- the research idioms keep working ---------------------------------------------------------


def test_activation_patching_with_augmented_assignment_matches_a_local_run(model):
    def run(mode):
        with model.trace(PROMPT, remote=mode):
            out = model.transformer.h[1].output[0]
            out[:, -1] += 1.0
            model.transformer.h[2].output[0][:] += 0.5
            total = 0
            for i in range(3):
                total += i
            values = [float(v) for v in range(2)]
            logits = model.lm_head.output.save()
        return logits

    torch.testing.assert_close(run(False), run("local"))


def test_interlace_save_inside_a_body(model):
    with model.trace(PROMPT, remote="local"):
        h = interlace.save(model.transformer.h[0].output[0])
    assert isinstance(h, torch.Tensor)


def test_printing_is_bounded_by_the_policy(model, capsys):
    from interlace.contract.code.decode import restricted_builtins

    lines: list[str] = []
    builtins = restricted_builtins(Policy(max_log_bytes=100), lines.append)
    for _ in range(100):
        builtins["print"]("x" * 30)
    assert sum(len(line) for line in lines) < 400
    assert sum("max_log_bytes" in line for line in lines) == 1


# -- the ticks: wall time and memory --------------------------------------------------------------


def test_an_endless_loop_stops_at_the_wall_time_limit():
    guards = JobGuards(Policy(timeout_seconds=0.2))
    ns = {"__builtins__": {**guards.names(), "range": range}}
    import ast

    tree = guard_module(ast.parse("n = 0\nwhile True:\n    n += 1\n"))
    with pytest.raises(JobLimitExceeded, match="wall-time limit of 0.2 s"):
        exec(compile(tree, "<t>", "exec"), ns)


def test_a_caught_limit_keeps_raising():
    guards = JobGuards(Policy(timeout_seconds=0.1))
    import ast

    source = "def f():\n    while True:\n        pass\ntry:\n    f()\nexcept BaseException:\n    pass\nwhile True:\n    pass\n"
    tree = guard_module(ast.parse(source))
    with pytest.raises(JobLimitExceeded):
        exec(compile(tree, "<t>", "exec"), {"__builtins__": {**guards.names(), "BaseException": BaseException}})


def test_comprehensions_tick_too():
    guards = JobGuards(Policy(timeout_seconds=0.1))
    import ast
    import itertools

    tree = guard_module(ast.parse("x = sum(1 for _ in count())\n"))
    with pytest.raises(JobLimitExceeded):
        exec(compile(tree, "<t>", "exec"), {"__builtins__": {**guards.names(), "sum": sum}, "count": itertools.count})


def test_memory_growth_past_the_limit_stops_the_job():
    guards = JobGuards(Policy(max_memory_bytes=50 * 1024 * 1024))
    import ast

    tree = guard_module(ast.parse("keep = []\nwhile True:\n    keep.append(bytearray(1024 * 1024))\n"))
    with pytest.raises(JobLimitExceeded, match="max_memory_bytes"):
        exec(compile(tree, "<t>", "exec"), {"__builtins__": {**guards.names(), "bytearray": bytearray}})


# -- module proxies --------------------------------------------------------------------------------


@pytest.mark.parametrize("module,name", [
    ("torch", "load"), ("torch", "save"), ("torch", "hub"), ("torch", "ops"), ("torch", "utils"), ("torch", "_C"),
    ("torch", "from_file"), ("torch", "set_default_dtype"), ("torch", "manual_seed"), ("torch", "jit"),
    ("numpy", "load"), ("numpy", "save"), ("numpy", "fromfile"), ("numpy", "memmap"), ("numpy", "ctypeslib"),
    ("numpy", "lib"), ("numpy", "sctypeDict"), ("operator", "methodcaller"), ("string", "Formatter"),
    ("time", "sleep"), ("decimal", "getcontext"), ("typing", "get_type_hints"), ("random", "seed"),
    ("torch.nn", "utils"), ("torch.nn.functional", "torch"), ("collections", "UserString"),
])
def test_proxies_refuse_the_dangerous_names(module, name):
    proxy = module_proxy(module)
    with pytest.raises(AttributeError):
        getattr(proxy, name)


def test_proxies_are_read_only_and_have_no_dict():
    torch_proxy = module_proxy("torch")
    with pytest.raises(AttributeError):
        torch_proxy.zeros = None
    guards = JobGuards(DEFAULT_POLICY)
    for name in ("__dict__", "_module", "__class__"):
        with pytest.raises(AccessRefused):
            guards.getattr(torch_proxy, name)
    assert torch_proxy.zeros is torch.zeros
    assert guards.getattr(torch_proxy, "nn") is module_proxy("torch.nn")
