"""Code shipping in every mode: `@remote` classes, helpers that reach the model through a
global or a closure, and failures that show the user's own lines.

Values are compared with raw PyTorch forward hooks on a separately loaded copy of the model
(tests/raw_truth.py), on two prompts of different lengths.
"""

from __future__ import annotations

import linecache
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import interlace
from interlace import remote
from raw_truth import RawLM

PROMPTS = ("The Eiffel Tower is in the city of", "Madison Square Garden is")
TOL = 1e-5


@pytest.fixture(scope="module")
def model(tiny_gpt2_path: Path) -> interlace.LanguageModel:
    return interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)


@pytest.fixture(scope="module")
def raw(tiny_gpt2_path: Path) -> RawLM:
    return RawLM(tiny_gpt2_path)


@pytest.fixture(params=["local", True], ids=["simulated", "server"])
def remote_mode(request: pytest.FixtureRequest) -> Any:
    if request.param is True:
        request.getfixturevalue("use_server")
    return request.param


# -- @remote classes (seed 000's headline example) ---------------------------------------------


@interlace.remote
class LayerAnalyzer:
    def __init__(self, layer_idx):
        self.layer_idx = layer_idx

    def analyze(self, hidden):
        return hidden.mean(dim=-1)


@remote(version="1.0")
class Scaler:
    factor = 3.0

    def __init__(self, offset):
        self.offset = offset

    def apply(self, hidden):
        positions = torch.arange(hidden.shape[-2], dtype=hidden.dtype).unsqueeze(-1)
        return hidden * self.factor + positions * self.offset


@pytest.mark.parametrize("prompt", PROMPTS)
def test_remote_decorated_class_instance_as_in_seed_000(model, raw, mode, prompt):
    analyzer = LayerAnalyzer(2)
    with model.trace(prompt, remote=mode):
        hidden = model.transformer.h[analyzer.layer_idx].output[0]
        analysis = analyzer.analyze(hidden).save()
    _, seen = raw.run(prompt, capture=("transformer.h.2",))
    expected = seen["transformer.h.2"][0].mean(dim=-1)
    assert analysis.shape == (raw.n_tokens(prompt),)
    assert torch.allclose(analysis, expected, atol=TOL)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_remote_class_with_arguments_and_class_attribute(model, raw, mode, prompt):
    scaler = Scaler(0.5)
    with model.trace(prompt, remote=mode):
        scaled = scaler.apply(model.transformer.h[1].output).save()
    _, seen = raw.run(prompt, capture=("transformer.h.1",))
    h = seen["transformer.h.1"]
    expected = h * 3.0 + torch.arange(h.shape[-2], dtype=h.dtype).unsqueeze(-1) * 0.5
    assert torch.allclose(scaled, expected, atol=TOL)


# -- helpers that reach the model through a global or a closure --------------------------------

HELPER_MODEL: Any = None  # set by the `helper_model` fixture: the traced model, as a global
HELPER_BLOCKS: Any = None  # its blocks (a submodule envoy), as a global


@pytest.fixture
def helper_model(model):
    global HELPER_MODEL, HELPER_BLOCKS
    HELPER_MODEL, HELPER_BLOCKS = model, model.transformer.h
    yield model
    HELPER_MODEL = HELPER_BLOCKS = None


def layer(i):
    return HELPER_MODEL.transformer.h[i]


def last_position_to_zero(i):
    HELPER_BLOCKS[i].output[:, -1] = 0


def make_reader(blocks):
    def read(i):
        return blocks[i].output

    return read


def make_logits_reader(lm):
    return lambda: lm.lm_head.output


@pytest.mark.parametrize("prompt", PROMPTS)
def test_helper_reaches_model_through_a_global(helper_model, raw, mode, prompt):
    with helper_model.trace(prompt, remote=mode):
        h = layer(1).output.save()
    _, seen = raw.run(prompt, capture=("transformer.h.1",))
    assert torch.allclose(h, seen["transformer.h.1"], atol=TOL)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_helper_edits_through_a_global_submodule(helper_model, raw, mode, prompt):
    with helper_model.trace(prompt, remote=mode):
        last_position_to_zero(2)
        logits = helper_model.lm_head.output.save()

    def zero_last(module, args, out):
        out = out.clone()
        out[:, -1] = 0
        return out

    expected, _ = raw.run(prompt, edits={"transformer.h.2": zero_last})
    unedited, _ = raw.run(prompt)
    assert torch.allclose(logits, expected, atol=1e-4)
    assert not torch.allclose(expected[:, -1], unedited[:, -1], atol=1e-3)  # the edit mattered
    assert torch.allclose(logits[:, :-1], unedited[:, :-1], atol=1e-4)  # and only at the last position


@pytest.mark.parametrize("prompt", PROMPTS)
def test_closures_over_a_submodule_and_over_the_model(model, raw, mode, prompt):
    read = make_reader(model.transformer.h)
    logits_of = make_logits_reader(model)
    with model.trace(prompt, remote=mode):
        h3 = read(3).save()
        logits = logits_of().save()
    expected_logits, seen = raw.run(prompt, capture=("transformer.h.3",))
    assert torch.allclose(h3, seen["transformer.h.3"], atol=TOL)
    assert torch.allclose(logits, expected_logits, atol=1e-4)


def test_list_of_envoys_in_the_body(model, raw, mode):
    picked = [model.transformer.h[0], model.transformer.h[3]]
    with model.trace(PROMPTS[0], remote=mode):
        first = picked[0].output.save()
        last = picked[-1].output.save()
    _, seen = raw.run(PROMPTS[0], capture=("transformer.h.0", "transformer.h.3"))
    assert torch.allclose(first, seen["transformer.h.0"], atol=TOL)
    assert torch.allclose(last, seen["transformer.h.3"], atol=TOL)


def test_model_refs_are_listed_in_verbose_output(model, capsys):
    read = make_reader(model.transformer.h)
    with model.trace(PROMPTS[0], remote="local", verbose=True):
        h = read(0).save()
    assert h.shape[-1] == 128
    out = capsys.readouterr().out
    assert "Model refs in shipped code: ['read: blocks -> model.transformer.h']" in out


def test_a_helper_using_another_model_is_refused(model, tiny_gpt2_path, remote_mode):
    other = interlace.LanguageModel(str(tiny_gpt2_path))
    read_other = make_reader(other.transformer.h)
    with pytest.raises(interlace.RemoteValidationError) as info:
        with model.trace(PROMPTS[0], remote=remote_mode):
            h = read_other(0).save()  # noqa: F841
    problem = info.value.problems[0]
    assert problem.category == "unserializable-variable"
    assert "`read` uses `blocks`" in problem.message and "different model" in problem.message
    assert "separate trace" in problem.fix and "as_tensor" not in problem.fix


# -- a failure while the server rebuilds the user's code is the user's error -------------------


@remote
class ReadsItsFile:
    here = __file__  # no file on the server: NameError when the class is rebuilt there


def test_user_code_failing_while_rebuilt_is_a_user_error(model, remote_mode):
    thing = ReadsItsFile()
    with pytest.raises(interlace.RemoteException) as info:
        with model.trace(PROMPTS[0], remote=remote_mode):
            h = model.transformer.h[0].output.save()
            name = thing.here  # noqa: F841
    text = str(info.value)
    assert "Internal server error" not in text and "server problem" not in text
    assert "NameError" in text and "__file__" in text
    assert "here = __file__" in text  # the user's line
    assert info.value.category == "invalid-request"


# -- tracebacks show the user's line in every frame, the same in both remote modes -------------


def boom_inner(x):
    return x.no_such_attribute


def boom_outer(x):
    return boom_inner(x * 2)


@remote
class Probe:
    def look(self, hidden):
        return hidden.missing_in_method


def fail_in_body(model, mode):
    with model.trace(PROMPTS[0], remote=mode):
        model.transformer.h[0].output.no_such_thing


def fail_in_helper(model, mode):
    with model.trace(PROMPTS[0], remote=mode):
        h = boom_outer(model.transformer.h[0].output).save()  # noqa: F841


def fail_in_remote_method(model, mode):
    probe = Probe()
    with model.trace(PROMPTS[0], remote=mode):
        h = probe.look(model.transformer.h[1].output).save()  # noqa: F841


def fail_in_invoke_with_helper(model, mode):
    with model.trace(remote=mode) as tracer:
        with tracer.invoke(PROMPTS[1]):
            h = boom_inner(model.transformer.h[1].output).save()  # noqa: F841


def fail_in_generate(model, mode):
    with model.generate(PROMPTS[0], max_new_tokens=2, remote=mode):
        logits = boom_outer(model.lm_head.output).save()  # noqa: F841


def fail_in_session(model, mode):
    with model.session(remote=mode):
        with model.trace(PROMPTS[1]):
            h = boom_inner(model.transformer.h[2].output).save()  # noqa: F841


FAILING = [fail_in_body, fail_in_helper, fail_in_remote_method, fail_in_invoke_with_helper, fail_in_generate, fail_in_session]
_FRAME = re.compile(r'  File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>.+)')


def _remote_traceback(case, model, mode) -> str:
    with pytest.raises(interlace.RemoteException) as info:
        case(model, mode)
    return str(info.value)


def _frames(text: str) -> list[tuple[str, int, str, str | None]]:
    lines = text.splitlines()
    frames = []
    for i, line in enumerate(lines):
        m = _FRAME.fullmatch(line)
        if m:
            following = lines[i + 1] if i + 1 < len(lines) else ""
            shown = following.strip() if following.startswith("    ") and not _FRAME.fullmatch(following) else None
            frames.append((m["file"], int(m["line"]), m["name"], shown))
    return frames


@pytest.mark.parametrize("case", FAILING, ids=lambda f: f.__name__)
def test_every_frame_of_a_remote_failure_shows_the_users_line(model, case, use_server):
    simulated = _remote_traceback(case, model, "local")
    served = _remote_traceback(case, model, True)
    assert simulated == served
    frames = _frames(simulated)
    assert frames, simulated
    for filename, lineno, _name, shown in frames:
        assert filename == __file__
        assert shown == linecache.getline(__file__, lineno).strip(), (lineno, simulated)
    # the innermost frame is where the error was raised, the outermost is in the with block
    assert frames[0][2] == "<with block>"
    assert "AttributeError" in simulated.splitlines()[-1]


def test_failure_frames_name_the_helpers_in_call_order(model):
    text = _remote_traceback(fail_in_helper, model, "local")
    names = [name for _, _, name, _ in _frames(text)]
    assert names == ["<with block>", "boom_outer", "boom_inner"]
    text = _remote_traceback(fail_in_remote_method, model, "local")
    assert [name for _, _, name, _ in _frames(text)] == ["<with block>", "look"]
