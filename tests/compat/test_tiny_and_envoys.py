"""nnsight's own `test_tiny.py` and `test_envoys.py` behaviours, and the Envoy surface
(nnsight-behavior.md §5.1, §5.8, §5.12, §1.6, §1.12), ported to Interlace.

The MLP is `NNsight(module)`: not hosted by the test server, so its ports run here
(`remote=False`) and through the server's own path in-process (`remote='local'`). Truths are
the plain module (raw forward hooks, `torch.autograd.grad`) rather than nnsight's outputs.
Differences from nnsight's tests: the tiny MLP here has an `act` (ReLU) between `layer1` and
`layer2`. A name saved on a line that did not run is unbound afterwards, as in nnsight; a
name assigned but never saved is `interlace.NotSavedError` when used (an `UnboundLocalError`
too), Interlace's stricter side.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch

import interlace
from interlace import Envoy, NNsight


@pytest.fixture(params=[False, "local"], ids=["local-run", "simulated"])
def tmode(request: pytest.FixtureRequest):
    """`remote=` for the MLP's traces: here, or through the server's path in-process."""
    return request.param


@pytest.fixture
def tiny(tiny_mlp: torch.nn.Sequential) -> NNsight:
    return NNsight(tiny_mlp)


def _raw(module: torch.nn.Module, x: torch.Tensor, *hooks) -> torch.Tensor:
    handles = [m.register_forward_hook(h) for m, h in hooks]
    try:
        with torch.no_grad():
            return module(x)
    finally:
        for handle in handles:
            handle.remove()


# --- §5.1 basics ------------------------------------------------------------------------------


def test_output_save_is_a_tensor(tiny, tiny_mlp, tiny_input, tmode):
    with torch.no_grad():
        with tiny.trace(tiny_input, remote=tmode):
            hs = tiny.layer2.output.save()
    assert isinstance(hs, torch.Tensor)
    torch.testing.assert_close(hs, _raw(tiny_mlp, tiny_input), rtol=0, atol=0)


def test_torch_creation_ops_on_real_shapes(tiny, tiny_input, tmode):
    with tiny.trace(tiny_input, remote=tmode):
        l1 = tiny.layer1.output
        shapes = interlace.save([])
        shapes.append(tuple(torch.arange(l1.shape[0], l1.shape[1]).shape))
        shapes.append(tuple(torch.empty(l1.shape).shape))
        shapes.append(tuple(torch.eye(l1.shape[0]).shape))
        shapes.append(tuple(torch.full(l1.shape, 5).shape))
        shapes.append(tuple(torch.linspace(l1.shape[0], l1.shape[1], 5).shape))
        shapes.append(tuple(torch.logspace(l1.shape[0], l1.shape[1], 5).shape))
        shapes.append(tuple(torch.ones(l1.shape).shape))
        shapes.append(tuple(torch.rand(l1.shape).shape))
        shapes.append(tuple(torch.randint(5, l1.shape).shape))
        shapes.append(tuple(torch.randn(l1.shape).shape))
        shapes.append(tuple(torch.randperm(l1.shape[0]).shape))
        shapes.append(tuple(torch.zeros(l1.shape).shape))
    assert [tuple(s) for s in shapes] == [
        (9,), (1, 10), (1, 1), (1, 10), (5,), (5,), (1, 10), (1, 10), (1, 10), (1, 10), (1,), (1, 10),
    ]


# --- §5.1 gradients -------------------------------------------------------------------------------


def test_grad_get_then_set(tiny, tiny_mlp, tiny_input, tmode):
    with tiny.trace(tiny_input, remote=tmode):
        l1o = tiny.layer1.output
        loss = tiny.output.sum()
        with loss.backward():
            l1_grad = l1o.grad.clone().save()
            l1o.grad = l1o.grad.clone() * 2
            l1_grad_double = l1o.grad.save()
    assert torch.equal(l1_grad * 2, l1_grad_double)
    seen = {}
    x = tiny_input.clone()
    handle = tiny_mlp.layer1.register_forward_hook(lambda m, a, o: seen.__setitem__("l1", o))
    try:
        out = tiny_mlp(x)
    finally:
        handle.remove()
    (truth,) = torch.autograd.grad(out.sum(), seen["l1"])
    torch.testing.assert_close(l1_grad, truth, rtol=0, atol=1e-7)


def test_grad_set_reaches_earlier_gradients(tiny, tiny_mlp, tiny_input, tmode):
    """Doubling the gradient at layer2's input doubles what flows on to layer1's weights."""
    with tiny.trace(tiny_input, remote=tmode):
        l1 = tiny.layer1.output
        a = tiny.act.output
        loss = tiny.output.sum()
        with loss.backward():
            a.grad = a.grad * 2
            g1 = l1.grad.save()
    seen = {}
    handle = tiny_mlp.layer1.register_forward_hook(lambda m, a_, o: seen.__setitem__("l1", o))
    try:
        out = tiny_mlp(tiny_input.clone())
    finally:
        handle.remove()
    (truth,) = torch.autograd.grad(out.sum(), seen["l1"])
    torch.testing.assert_close(g1, truth * 2, rtol=0, atol=1e-7)


# --- §5.1 conditionals --------------------------------------------------------------------------


def test_true_conditional(tiny, tiny_input, tmode):
    with tiny.trace(tiny_input, remote=tmode):
        num = 5
        if num > 0:
            tiny.layer1.output[:] = 1
            l1_out = tiny.layer1.output.save()
    assert isinstance(l1_out, torch.Tensor)
    assert torch.all(l1_out == 1).item()


def test_false_conditional_leaves_its_names_unbound(tiny, tiny_input, tmode):
    with tiny.trace(tiny_input, remote=tmode):
        num = 5
        if num < 0:
            tiny.layer1.output[:] = 1
            l1_out = tiny.layer1.output.save()
        l2_out = tiny.layer2.output.save()
    with pytest.raises(UnboundLocalError):
        l1_out  # noqa: B018
    assert isinstance(l2_out, torch.Tensor)


def test_tensor_as_condition(tiny, tiny_input, tmode):
    with tiny.trace(tiny_input, remote=tmode):
        out = tiny.layer1.output
        out[:, 0] = 1
        if out[:, 0] != 1:
            tiny.layer1.output[:] = 1
            l1_out = tiny.layer1.output.save()
    with pytest.raises(UnboundLocalError):
        l1_out  # noqa: B018


def test_dependent_conditionals(tiny, tiny_input, tmode):
    with tiny.trace(tiny_input, remote=tmode):
        num = 5
        l1_out = tiny.layer1.output
        l2_out = tiny.layer2.output.save()
        if num > 0:
            l1_out[:] = 1
        if l1_out[:, 0] != 1:
            tiny.layer2.output[:] = 2
        if l1_out[:, 0] == 1:
            l2_out[:] = 3
    assert torch.all(l2_out == 3).item()


def test_nested_conditionals(tiny, tiny_input, tmode):
    with tiny.trace(tiny_input, remote=tmode):
        num = 5
        if num > 0:
            l1_out = tiny.layer1.output.save()
            if num > 0:
                tiny.layer1.output[:] = 1
            if num < 0:
                tiny.layer1.output[:] = 2
        if num < 0:
            tiny.layer2.output[:] = 0
            if num > 0:
                l2_out = tiny.layer2.output.save()
    assert torch.all(l1_out == 1).item()
    with pytest.raises(UnboundLocalError):
        l2_out  # noqa: B018


def test_in_place_edit_is_seen_downstream(tiny, tiny_mlp, tiny_input, tmode):
    with tiny.trace(tiny_input, remote=tmode):
        tiny.layer1.output[:] = 1
        out = tiny.output.save()
    truth = _raw(tiny_mlp, tiny_input, (tiny_mlp.layer1, lambda m, a, o: torch.ones_like(o)))
    torch.testing.assert_close(out, truth, rtol=0, atol=0)


# --- §5.1 sessions --------------------------------------------------------------------------------


def test_session_saved_value_mutated_by_a_later_trace(tiny, tiny_input, tmode):
    with tiny.session(remote=tmode):
        with tiny.trace(tiny_input):
            l1_out = tiny.layer1.output.save()
        with tiny.trace(tiny_input):
            l1_out[:, 2] = 5
    assert l1_out[:, 2] == 5


def test_session_trace_inside_if(tiny, tiny_mlp, tiny_input, tmode):
    with tiny.session(remote=tmode):
        num = 5
        if num > 0:
            with tiny.trace(tiny_input):
                output = tiny.output.save()
    torch.testing.assert_close(output, _raw(tiny_mlp, tiny_input), rtol=0, atol=0)


def test_session_traces_inside_for_with_a_list_saved_across(tiny, tiny_input, tmode):
    with tiny.session(remote=tmode):
        result = [].save()
        for item in [0, 1, 2]:
            if item % 2 == 0:
                with tiny.trace(tiny_input):
                    result.append(item)
    assert result == [0, 2]


def test_session_outer_variable_used_inside_a_trace(tiny, tiny_input, tmode):
    with tiny.session(remote=tmode):
        val = 0
        with tiny.trace(tiny_input):
            tiny.layer1.output[:] = val
            l1_out = tiny.layer1.output.save()
    assert torch.all(l1_out == 0).item()


def test_session_break_in_a_loop(tiny, tmode):
    with tiny.session(remote=tmode):
        items = [].save()
        items.append(0)
        for item in [1, 2, 3, 4]:
            if item == 3:
                break
            items.append(item)
        items.append(5)
    assert items == [0, 1, 2, 5]


def test_session_break_leaves_no_trace(tiny, tmode):
    with tiny.session(remote=tmode):
        items = [].save()
        for item in [0, 1, 2]:
            if item == 2:
                break
            items.append(item)
    assert items == [0, 1]


def test_session_nested_loops(tiny, tmode):
    with tiny.session(remote=tmode):
        outer = [].save()
        outer.append([0])
        outer.append([1])
        outer.append([2])
        flat = [].save()
        for item in outer:
            for item_2 in item:
                flat.append(item_2)
    assert flat == [0, 1, 2]


def test_session_builtins_in_lists(tiny):
    """nnsight stores the type `int` in saved lists; a type cannot travel back from a server
    (only data does), so this runs here only."""
    with tiny.session():
        nn_list = [].save()
        sesh_list = [].save()
        apply_list = [].save()
        for lst in [nn_list, sesh_list, apply_list]:
            lst.append(int)
            lst.append("Hello World")
            lst.append({"a": "1"})
    assert nn_list == sesh_list == apply_list == [int, "Hello World", {"a": "1"}]


def test_session_data_in_lists(tiny, tmode):
    with tiny.session(remote=tmode):
        first = [].save()
        second = [].save()
        for lst in [first, second]:
            lst.append(3)
            lst.append("Hello World")
            lst.append({"a": "1"})
    assert first == second == [3, "Hello World", {"a": "1"}]


# --- §5.1 early stop ------------------------------------------------------------------------------


def test_stop_keeps_values_saved_before_it(tiny, tiny_input, tmode):
    with tiny.trace(tiny_input, remote=tmode) as tracer:
        l1_out = tiny.layer1.output.save()
        tracer.stop()
        l2_out = tiny.layer2.output.save()
    assert isinstance(l1_out, torch.Tensor)
    with pytest.raises(UnboundLocalError):
        l2_out  # noqa: B018


def test_code_after_stop_does_not_run(tiny, tiny_input, tmode):
    with tiny.trace(tiny_input, remote=tmode) as tracer:
        l1_out = tiny.layer1.output
        tracer.stop()
        l1_out_double = (l1_out * 2).save()
    with pytest.raises(UnboundLocalError):
        l1_out_double  # noqa: B018


def test_stop_ends_the_forward(tiny, tiny_mlp, tiny_input):
    calls = []
    handle = tiny_mlp.layer2.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        with tiny.trace(tiny_input) as tracer:
            l1 = tiny.layer1.output.save()
            tracer.stop()
    finally:
        handle.remove()
    assert calls == [] and l1.shape == (1, 10)


def test_a_saved_name_whose_line_did_not_run_keeps_its_earlier_value(tiny, tiny_input, tmode):
    """nnsight binds only what was saved; a default given before the block stays (Interlace
    used to replace it with a placeholder, contrary to its own advice)."""
    late = None
    with tiny.trace(tiny_input, remote=tmode) as tracer:
        early = tiny.layer1.output.save()
        tracer.stop()
        late = tiny.layer2.output.save()
    assert late is None and early.shape == (1, 10)


def test_an_unsaved_name_still_says_so(tiny, tiny_input, tmode):
    """Interlace's stricter side stays: a name assigned but never saved raises NotSavedError."""
    with tiny.trace(tiny_input, remote=tmode):
        hidden = tiny.layer1.output  # noqa: F841
        out = tiny.output.save()
    assert out.shape == (1, 2)
    with pytest.raises(interlace.NotSavedError, match="`hidden` was assigned in the trace"):
        hidden.shape


# --- §5.8 envoys= ------------------------------------------------------------------------------
# nnsight's tests/test_envoys.py, with `from nnsight.intervention.envoy import Envoy` as
# `from interlace import Envoy`.


class _MyEnvoy(Envoy):
    pass


class _OtherEnvoy(Envoy):
    pass


class _LinearEnvoy(Envoy):
    pass


def _nested_net() -> torch.nn.Module:
    return torch.nn.Sequential(OrderedDict([
        ("layer1", torch.nn.Linear(5, 10)),
        ("inner", torch.nn.Sequential(OrderedDict([("act", torch.nn.ReLU()), ("layer2", torch.nn.Linear(10, 2))]))),
    ]))


def _descendant_types(model):
    return {envoy.path: type(envoy) for envoy in model.modules() if envoy is not model}


class TestEnvoysParam:
    def test_default_is_plain_envoy(self):
        model = NNsight(_nested_net())
        types = _descendant_types(model)
        assert set(types) == {"model.layer1", "model.inner", "model.inner.act", "model.inner.layer2"}
        assert all(t is Envoy for t in types.values()), types

    def test_single_class_applies_to_all(self):
        model = NNsight(_nested_net(), envoys=_MyEnvoy)
        assert all(t is _MyEnvoy for t in _descendant_types(model).values())

    def test_dict_matches_and_falls_back(self):
        model = NNsight(_nested_net(), envoys={torch.nn.Linear: _LinearEnvoy})
        assert type(model.layer1) is _LinearEnvoy
        assert type(model.inner.layer2) is _LinearEnvoy
        assert type(model.inner.act) is Envoy
        assert type(model.inner) is Envoy

    def test_dict_matches_subclass_via_mro(self):
        class MyLinear(torch.nn.Linear):
            pass

        model = NNsight(torch.nn.Sequential(MyLinear(5, 10), torch.nn.ReLU()), envoys={torch.nn.Linear: _LinearEnvoy})
        assert type(model[0]) is _LinearEnvoy
        assert type(model[1]) is Envoy

    def test_propagates_to_grandchildren(self):
        model = NNsight(_nested_net(), envoys=_MyEnvoy)
        assert type(model.inner.act) is _MyEnvoy
        assert type(model.inner.layer2) is _MyEnvoy

    def test_refuses_what_is_not_an_envoy_class(self):
        with pytest.raises(TypeError, match=r"(?s)envoys= takes an Envoy subclass.*torch.nn.Linear: LinearEnvoy"):
            NNsight(_nested_net(), envoys={torch.nn.Linear: object})


class TestNNsightClassAttribute:
    def test_base_default_is_none(self):
        assert NNsight.envoys is None

    def test_subclass_class_attribute_applied(self):
        class MyModel(NNsight):
            envoys = _MyEnvoy

        assert all(t is _MyEnvoy for t in _descendant_types(MyModel(_nested_net())).values())

    def test_subclass_dict_class_attribute_applied(self):
        class MyModel(NNsight):
            envoys = {torch.nn.Linear: _LinearEnvoy}

        model = MyModel(_nested_net())
        assert type(model.layer1) is _LinearEnvoy
        assert type(model.inner.layer2) is _LinearEnvoy
        assert type(model.inner.act) is Envoy

    def test_user_kwarg_overrides_class_default(self):
        class MyModel(NNsight):
            envoys = _MyEnvoy

        assert all(t is _OtherEnvoy for t in _descendant_types(MyModel(_nested_net(), envoys=_OtherEnvoy)).values())

    def test_user_kwarg_none_overrides_class_default(self):
        class MyModel(NNsight):
            envoys = _MyEnvoy

        assert all(t is Envoy for t in _descendant_types(MyModel(_nested_net(), envoys=None)).values())

    def test_subclass_methods_on_wrapped_children(self, tiny_input):
        class SpyEnvoy(Envoy):
            def marker(self):
                return f"spy:{self.path}"

            def doubled(self):  # a helper that reads the module's output inside a trace
                return self.output * 2

        class MyModel(NNsight):
            envoys = {torch.nn.Linear: SpyEnvoy}

        net = _nested_net()
        model = MyModel(net)
        assert model.layer1.marker() == "spy:model.layer1"
        assert model.inner.layer2.marker() == "spy:model.inner.layer2"
        with model.trace(tiny_input):
            doubled = model.layer1.doubled().save()
        torch.testing.assert_close(doubled, net.layer1(tiny_input) * 2)


class TestStringKeys:
    def test_last_path_component(self):
        model = NNsight(_nested_net(), envoys={"layer1": _MyEnvoy})
        assert type(model.layer1) is _MyEnvoy
        assert type(model.inner.act) is Envoy
        assert type(model.inner.layer2) is Envoy

    def test_no_substring_match(self):
        model = NNsight(_nested_net(), envoys={"layer": _MyEnvoy})
        assert type(model.layer1) is Envoy
        assert type(model.inner.layer2) is Envoy

    def test_multi_component_key(self):
        model = NNsight(_nested_net(), envoys={"inner.layer2": _MyEnvoy})
        assert type(model.inner.layer2) is _MyEnvoy
        assert type(model.inner.act) is Envoy
        assert type(model.layer1) is Envoy

    def test_leading_dot_is_stripped(self):
        model = NNsight(_nested_net(), envoys={".layer1": _MyEnvoy})
        assert type(model.layer1) is _MyEnvoy

    def test_type_keys_win_over_string_keys(self):
        model = NNsight(_nested_net(), envoys={"layer1": _MyEnvoy, torch.nn.Linear: _LinearEnvoy})
        assert type(model.layer1) is _LinearEnvoy

    def test_rename_alias_matches(self):
        class AttentionLike(torch.nn.Module):
            def forward(self, x):
                return x

        net = torch.nn.Sequential(OrderedDict([("self_attn", AttentionLike()), ("layer1", torch.nn.Linear(5, 5))]))
        model = NNsight(net, rename={"self_attn": "attn"}, envoys={"attn": _MyEnvoy})
        assert type(model.self_attn) is _MyEnvoy
        assert type(model.attn) is _MyEnvoy
        assert model.attn is model.self_attn
        assert type(model.layer1) is Envoy

    def test_without_alias_no_match(self):
        class AttentionLike(torch.nn.Module):
            def forward(self, x):
                return x

        model = NNsight(torch.nn.Sequential(OrderedDict([("self_attn", AttentionLike())])), envoys={"attn": _MyEnvoy})
        assert type(model.self_attn) is Envoy

    def test_no_match_falls_back(self):
        model = NNsight(_nested_net(), envoys={"nonexistent": _MyEnvoy})
        assert all(t is Envoy for t in _descendant_types(model).values())


def test_language_model_takes_envoys(tiny_gpt2_path):
    """nnsight drops `envoys=` given to LanguageModel (a bug); here it applies."""
    lm = interlace.LanguageModel(str(tiny_gpt2_path), envoys={"mlp": _MyEnvoy})
    assert type(lm.transformer.h[0].mlp) is _MyEnvoy
    assert type(lm.transformer.h[0].attn) is Envoy


# --- §1.6 the Envoy surface ----------------------------------------------------------------------


def test_get_by_dotted_path_outside_and_inside_a_trace(tiny, tiny_mlp, tiny_input, tmode):
    assert tiny.get("layer1") is tiny.layer1
    assert tiny.get(".layer2").path == "model.layer2"
    with tiny.trace(tiny_input, remote=tmode):
        out = tiny.get("layer1.output").save()
    torch.testing.assert_close(out, tiny_mlp.layer1(tiny_input), rtol=0, atol=0)


def test_modules_and_named_modules_as_nnsight(tiny):
    """Children before their parent, a list; `include_fn` filters, `names=True` pairs."""
    envoys = tiny.modules()
    assert isinstance(envoys, list)
    assert [e.path for e in envoys] == ["model.layer1", "model.act", "model.layer2", "model"]
    assert envoys[-1] is tiny
    linears = tiny.modules(include_fn=lambda e: isinstance(e._module, torch.nn.Linear))
    assert [e.path for e in linears] == ["model.layer1", "model.layer2"]
    assert tiny.named_modules()[0] == ("model.layer1", tiny.layer1)
    assert [n for n, _ in tiny.modules(names=True)] == ["model.layer1", "model.act", "model.layer2", "model"]
    assert [n for n, _ in tiny.named_modules(lambda e: e is tiny.act)] == ["model.act"]


def _stack() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Module()
    net.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])

    def forward(x):
        for layer in net.layers:
            x = layer(x)
        return x

    net.forward = forward
    return net


def test_module_list_envoys_index_len_iter_slice(tmode):
    net = _stack()
    model = NNsight(net)
    layers = model.layers
    assert len(layers) == 3
    assert [e.path for e in layers] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert layers[-1] is layers[2] and layers[-1].path == "model.layers.2"
    assert [e.path for e in layers[1:]] == ["model.layers.1", "model.layers.2"]
    with pytest.raises(IndexError):
        layers[3]
    x = torch.ones(1, 4)
    with torch.no_grad():
        with model.trace(x, remote=tmode):
            outs = interlace.save([])
            for layer in model.layers:
                outs.append(layer.output)
            last = model.layers[-1].output.save()
        truth = [net.layers[0](x)]
        truth.append(net.layers[1](truth[0]))
        truth.append(net.layers[2](truth[1]))
    assert len(outs) == 3
    for got, want in zip(outs, truth):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(last, truth[2], rtol=0, atol=0)


def test_calling_a_module_envoy_inside_a_trace(tiny, tiny_mlp, tiny_input, tmode):
    """`model.layer2(h)`: runs the module on a value (the logit lens shape); the traced
    forward is untouched."""
    with tiny.trace(tiny_input, remote=tmode):
        hidden = tiny.act.output
        direct = tiny.layer2(hidden * 2).save()
        out = tiny.output.save()
    with torch.no_grad():
        h = torch.relu(tiny_mlp.layer1(tiny_input))
        torch.testing.assert_close(direct, tiny_mlp.layer2(h * 2), rtol=0, atol=1e-6)
        torch.testing.assert_close(out, tiny_mlp(tiny_input), rtol=0, atol=0)


def test_call_with_hook_true_is_accepted(tiny, tiny_mlp, tiny_input):
    """nnsight's `envoy(x, hook=True)` calls the module with its hooks; `hook=` never reaches
    the module's forward."""
    with tiny.trace(tiny_input):
        hidden = tiny.act.output
        direct = tiny.layer2(hidden, hook=True).save()
    with torch.no_grad():
        torch.testing.assert_close(direct, tiny_mlp(tiny_input), rtol=0, atol=1e-6)
    assert torch.equal(tiny.layer1(tiny_input, hook=True), tiny_mlp.layer1(tiny_input))  # outside a trace too


def test_device_of_an_envoy(tiny):
    assert tiny.device == torch.device("cpu")
    assert tiny.layer1.device == torch.device("cpu")
    assert tiny.act.device is None  # no parameters
    assert tiny.devices == {torch.device("cpu")}


def test_repr_is_the_module_tree_with_aliases(tiny_mlp):
    model = NNsight(tiny_mlp, rename={"layer1": "first"})
    text = repr(model)
    assert "(layer1/first): Linear(in_features=5, out_features=10, bias=True)" in text
    assert "(layer2): Linear(in_features=10, out_features=2, bias=True)" in text
    assert repr(model.layer2) == "Linear(in_features=10, out_features=2, bias=True)"


def test_assigning_a_module_makes_a_child_envoy(tiny_input, tmode):
    net = torch.nn.Sequential(OrderedDict([("layer1", torch.nn.Linear(5, 10)), ("layer2", torch.nn.Linear(10, 2))]))
    model = NNsight(net)
    model.layer2.extra = torch.nn.Linear(2, 3)  # nnsight: a module value becomes a child envoy
    assert isinstance(model.layer2.extra, Envoy) and model.layer2.extra.path == "model.layer2.extra"
    assert net.layer2.extra is model.layer2.extra._module
    model.layer1.note = "a plain value"  # other values go to the module
    assert net.layer1.note == "a plain value" and model.layer1.note == "a plain value"
    with model.trace(tiny_input, remote=tmode):
        out = model.output.save()
        extra = model.layer2.extra(out).save()  # the added module is called by the body, not the forward
    with torch.no_grad():
        torch.testing.assert_close(extra, net.layer2.extra(net(tiny_input)), rtol=0, atol=1e-6)


class _Output(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.dense(x) + x


class _BertLikeLayer(torch.nn.Module):
    """BERT's layers have submodules named `output` (BertOutput) and `intermediate`."""

    def __init__(self) -> None:
        super().__init__()
        self.intermediate = torch.nn.Linear(4, 4)
        self.output = _Output()

    def forward(self, x):
        return self.output(self.intermediate(x))


def test_a_submodule_named_output_is_mounted_as_in_nnsight(tmode):
    torch.manual_seed(0)
    net = torch.nn.Sequential(_BertLikeLayer(), _BertLikeLayer())
    model = NNsight(net)
    with pytest.warns(UserWarning, match=r"`model.0.output`.*`model.0.nns_output`"):
        layer = model[0]
    assert isinstance(layer.output, Envoy) and layer.output.path == "model.0.output"
    assert layer.output.dense.path == "model.0.output.dense"
    x = torch.ones(1, 4)
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with model.trace(x, remote=tmode):
                dense = model[0].output.dense.output.save()   # the submodule's submodule
                sub = model[0].output.output.save()            # the `output` submodule's output
                whole = model[0].nns_output.save()             # the layer's own output
                model[0].output = whole * 0                    # assigning still edits the layer's output
                final = model[1].nns_output.save()
        inter = net[0].intermediate(x)
        torch.testing.assert_close(dense, net[0].output.dense(inter), rtol=0, atol=0)
        torch.testing.assert_close(sub, net[0](x), rtol=0, atol=0)
        torch.testing.assert_close(whole, net[0](x), rtol=0, atol=0)
        torch.testing.assert_close(final, net[1](torch.zeros(1, 4)), rtol=0, atol=0)


def test_other_modules_are_untouched_by_the_mount(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert type(tiny.layer1) is Envoy


# --- §1.12 rename --------------------------------------------------------------------------------


def test_rename_a_name_everywhere_a_path_and_several_aliases(tmode):
    net = _stack()
    model = NNsight(net, rename={"layers": ["blocks", "h"], "layers.1": "middle"})
    assert model.blocks is model.layers and model.h is model.layers
    assert model.middle is model.layers[1]
    x = torch.ones(1, 4)
    with torch.no_grad():
        with model.trace(x, remote=tmode):
            a = model.blocks[0].output.save()
            b = model.middle.output.save()
            c = model.layers[2].output.save()
        first = net.layers[0](x)
        second = net.layers[1](first)
    torch.testing.assert_close(a, first, rtol=0, atol=0)
    torch.testing.assert_close(b, second, rtol=0, atol=0)
    torch.testing.assert_close(c, net.layers[2](second), rtol=0, atol=0)


def test_rename_on_a_language_model(tiny_gpt2_path):
    lm = interlace.LanguageModel(str(tiny_gpt2_path), rename={".transformer": ["model", "mdl"], "mlp": "ffn", ".transformer.h": "layers"})
    assert lm.model is lm.transformer and lm.mdl is lm.transformer
    assert lm.model.h[0].ffn is lm.transformer.h[0].mlp
    assert lm.layers[1] is lm.transformer.h[1]
    with lm.trace("Hello"):
        via_alias = lm.layers[1].ffn.output.save()
        via_name = lm.transformer.h[1].mlp.output.save()
    assert torch.equal(via_alias, via_name)


# --- §1.6 extension: Envoy subclasses with their own views ----------------------------------------
# nnsight's `eproperty` is not offered; a plain property on an Envoy subclass reading and
# assigning `self.output` does the same job (a view that writes through, and a setter).


class _HeadsEnvoy(Envoy):
    n_heads = 2

    @property
    def heads(self):
        """layer1's (batch, 10) output as (batch, heads, 5)."""
        out = self.output
        return out.view(out.shape[0], self.n_heads, out.shape[1] // self.n_heads)

    @heads.setter
    def heads(self, value):
        self.output = value.reshape(value.shape[0], -1)


class _MoreHeadsEnvoy(_HeadsEnvoy):
    pass


@pytest.mark.parametrize("envoy_class", [_HeadsEnvoy, _MoreHeadsEnvoy])
def test_an_envoy_subclass_property_reads_edits_and_sets(tiny_mlp, tiny_input, tmode, envoy_class):
    model = NNsight(tiny_mlp, envoys={"layer1": envoy_class})
    with model.trace(tiny_input, remote=tmode):
        before = model.layer1.heads.clone().save()
        model.layer1.heads[:, 1] = 0           # in place, through the view
        edited = model.act.input.save()
    with model.trace(tiny_input, remote=tmode):
        model.layer1.heads = torch.ones(1, 2, 5)  # the setter replaces the output
        replaced = model.act.input.save()
    with torch.no_grad():
        l1 = tiny_mlp.layer1(tiny_input)
    torch.testing.assert_close(before, l1.view(1, 2, 5), rtol=0, atol=0)
    torch.testing.assert_close(edited, torch.cat([l1[:, :5], torch.zeros(1, 5)], dim=1), rtol=0, atol=0)
    torch.testing.assert_close(replaced, torch.ones(1, 10), rtol=0, atol=0)
    assert not hasattr(tiny_mlp.layer1, "heads")  # the setter did not land on the module
