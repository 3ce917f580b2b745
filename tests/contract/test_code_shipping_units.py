"""Units of code shipping: model references in shipped code (`x:model`), per-object file
names, `@remote`'s decoration errors, and decode failures that stay the user's errors."""

from __future__ import annotations

import torch
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import interlace
from interlace import remote
from interlace.contract.errors import UnsupportedValueError, WireFormatError
from interlace.contract.policy import DEFAULT_POLICY
from interlace.contract.problems import RemoteValidationError
from interlace.contract.code.decode import CodeDecoder, restricted_builtins
from interlace.contract.code.encode import CodeEncoder
from interlace.contract.code.origin import original_filename, remote_filename
from interlace.contract.values.decode import ValueDecoder
from interlace.contract.values.encode import ValueEncoder

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(3, 4)
        self.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()) for _ in range(3)])
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _nnsight() -> interlace.NNsight:
    torch.manual_seed(0)
    return interlace.NNsight(Net())


CLIENT = _nnsight()
SERVER = _nnsight()  # the server's own copy: same structure, different objects
PATHS = sorted(path for path, _ in CLIENT.named_modules())


def _roundtrip(value, *, client=CLIENT, server=SERVER):
    code = CodeEncoder(DEFAULT_POLICY, model=client)
    encoder = ValueEncoder(extension=code)
    node = encoder.encode(value)
    decoder = ValueDecoder(encoder.tensors, extension=CodeDecoder(code.objects, DEFAULT_POLICY, restricted_builtins(DEFAULT_POLICY), model=server))
    return node, decoder.decode(node)


def _decode_model_node(node, model=SERVER):
    decoder = ValueDecoder({}, extension=CodeDecoder({}, DEFAULT_POLICY, restricted_builtins(DEFAULT_POLICY), model=model))
    return decoder.decode(node)


# -- model references ----------------------------------------------------------------------------


@FAST
@given(st.lists(st.sampled_from(PATHS), min_size=1, max_size=5))
def test_envoys_travel_as_paths_and_bind_to_the_servers_model(paths):
    envoys = [CLIENT.get(p[len("model."):]) if p != "model" else CLIENT for p in paths]
    node, decoded = _roundtrip({"mods": envoys, "first": envoys[0]})
    assert [e.path for e in decoded["mods"]] == paths
    for envoy in decoded["mods"]:
        assert envoy._root is SERVER  # never the client's objects
        assert envoy._module is SERVER._module.get_submodule(envoy.path[len("model."):] if envoy.path != "model" else "")
    assert decoded["first"] is decoded["mods"][0]  # one envoy per module on the server


@FAST
@given(st.text(max_size=40) | st.builds(lambda parts: ".".join(["model", *parts]), st.lists(
    st.sampled_from(["embed", "blocks", "0", "1", "2", "3", "-1", "head", "weight", "forward", "_module", "__class__",
                     "training", "__dict__", "bias", "", "get"]), max_size=4)))
def test_any_model_path_decodes_to_a_submodule_or_a_clear_error(path):
    try:
        envoy = _decode_model_node({"$t": "x:model", "path": path})
    except WireFormatError as e:
        assert "model" in str(e)
        assert path not in PATHS
    else:
        assert path in PATHS
        assert envoy.path == path and isinstance(envoy._module, torch.nn.Module)


@pytest.mark.parametrize("node", [
    {"$t": "x:model", "path": "model.head.weight"},  # a parameter, not a module
    {"$t": "x:model", "path": "model.head.forward"},  # a method: would lead to its globals
    {"$t": "x:model", "path": "model._module"},
    {"$t": "x:model", "path": 3},
    {"$t": "x:model"},
    {"$t": "x:model", "path": "model", "extra": 1},
])
def test_malformed_model_references_are_wire_errors(node):
    with pytest.raises(WireFormatError):
        _decode_model_node(node)


def test_model_reference_needs_a_model_to_bind():
    with pytest.raises(WireFormatError, match="need a model"):
        _decode_model_node({"$t": "x:model", "path": "model"}, model=None)


def test_envoys_of_another_model_are_refused_at_encoding():
    other = _nnsight()
    with pytest.raises(UnsupportedValueError, match="different model"):
        ValueEncoder(extension=CodeEncoder(DEFAULT_POLICY, model=CLIENT)).encode([other.head])
    # at decoration time the traced model is not known yet: any model's modules are accepted
    node = ValueEncoder(extension=CodeEncoder(DEFAULT_POLICY)).encode(other.head)
    assert node == {"$t": "x:model", "path": "model.head"}


def test_closure_and_global_model_refs_in_a_shipped_function():
    blocks = CLIENT.blocks

    def second_block():
        return blocks[1]

    node, decoded = _roundtrip(second_block)
    assert decoded() is SERVER.blocks[1]


# -- file names of shipped code --------------------------------------------------------------------


@FAST
@given(st.text(max_size=60), st.none() | st.text(max_size=30))
def test_remote_filenames_map_back_to_the_users_file(filename, part):
    name = remote_filename(filename, part)
    assert name.startswith("<interlace-remote:")
    assert original_filename(name) == filename
    assert remote_filename(name) == name  # idempotent for the block's name


@FAST
@given(st.text(st.characters(blacklist_characters="\x00"), min_size=1, max_size=40).filter(lambda f: not f.startswith("<interlace-remote:")))
def test_engine_reports_shipped_frames_in_the_users_file(filename):
    from interlace.tracing.frames import user_location

    namespace = {"user_location": user_location}
    exec(compile("where = user_location(False)", remote_filename(filename, "helper:3:0abc"), "exec"), namespace)
    assert namespace["where"] == (filename, 1)


# -- @remote at decoration time ------------------------------------------------------------------


def test_decoration_errors_name_the_function_not_a_trace():
    with pytest.raises(RemoteValidationError) as info:
        @remote
        def reads_file(path):
            return open(path).read()

    text = str(info.value)
    assert text.startswith("`reads_file` cannot be sent to a server (1 problem):")
    assert "This trace" not in text
    assert info.value.categories == ["file-io"]


def test_decoration_errors_name_the_class():
    with pytest.raises(RemoteValidationError) as info:
        @remote
        class Uses:
            def go(self):
                import socket
                return socket.gethostname()

    assert str(info.value).startswith("`Uses` cannot be sent to a server (1 problem):")
    assert info.value.categories == ["network"]


def test_decorated_class_rebuilt_on_the_server_is_not_checked_again():
    """Shipped source is rebuilt in `__interlace_remote__`, without source files; a `@remote`
    inside shipped code must not try to read them (it failed with 'is a built-in class')."""
    namespace = {"remote": remote, "__name__": "__interlace_remote__"}
    exec("@remote\nclass Rebuilt:\n    pass\n", namespace)
    assert namespace["Rebuilt"].__interlace_remote__ == {"version": None, "library": None}


# -- a request that fails to decode on the server is the user's error --------------------------


def test_a_bad_model_ref_in_a_request_fails_the_job_with_a_clear_message(monkeypatch):
    from interlace.execution import run as runner

    real = runner.execute_request

    def tampered(request, *args, **kwargs):
        return real(request.model_copy(update={"model_refs": {"net": "model.head.forward"}}), *args, **kwargs)

    monkeypatch.setattr(runner, "execute_request", tampered)
    net = _nnsight()
    with pytest.raises(interlace.RemoteException) as info:
        with net.trace(torch.ones(1, 3), remote="local"):
            out = net.head.output.save()  # noqa: F841
    assert info.value.category == "invalid-request"
    text = str(info.value)
    assert "could not rebuild" in text and "'model.head.forward'" in text and "no submodule 'forward'" in text
