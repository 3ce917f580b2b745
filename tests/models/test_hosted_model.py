"""Models known only by their server key (`NNsight(model_key=...)`, `LanguageModel(model_key=...)`,
`RemoteBackend(model_key=...)`), against the session's real server.

The client gets the module tree, config and tokenizer from `GET /v1/models/{key}/meta` and has
no weights, so every value must come from the server's copy. The truth is raw PyTorch hooks
on a separately loaded copy of the tiny model, and a local trace of it loaded by path.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import interlace
from interlace import LanguageModel, NNsight
from interlace.backends.client import RemoteRequestError
from interlace.models.hosted import HostedModelError

ET_PROMPT = "The Eiffel Tower is in the city of"
MSG_PROMPT = "Madison Square Garden is located in the city of"

TOL = 1e-5
SHORT = "Hello"  # a different length from ET_PROMPT, so rows of the wrong prompt cannot pass


@pytest.fixture(scope="module")
def raw(tiny_gpt2_path: Path):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_path)).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_gpt2_path))


@torch.no_grad()
def raw_run(raw, prompt: str, capture: str, edit=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the output of module `capture` for `prompt`; `edit(name, out)` may change
    module outputs (forward hooks on h.1)."""
    model, tokenizer = raw
    seen = {}
    handles = []
    if edit is not None:
        handles.append(model.get_submodule("transformer.h.1").register_forward_hook(lambda m, a, out: edit(out)))
    handles.append(model.get_submodule(capture).register_forward_hook(lambda m, a, out: seen.setdefault("v", out.clone())))
    try:
        logits = model(**tokenizer(prompt, return_tensors="pt")).logits
    finally:
        for h in handles:
            h.remove()
    return logits, seen["v"]


def _meta_only(model: NNsight) -> bool:
    return all(t.device.type == "meta" for t in [*model._module.parameters(), *model._module.buffers()])


# -- building from the server's description ----------------------------------------------------


def test_hosted_nnsight_traces_on_the_server(use_server, tiny_gpt2_path, raw):
    """Seed 001's example: the values equal raw hooks on the real weights, for two prompts."""
    model = NNsight(model_key=str(tiny_gpt2_path))
    assert _meta_only(model)
    for prompt in (SHORT, ET_PROMPT):
        with model.trace(prompt, remote=True):
            hidden = model.transformer.h[0].output.save()
            logits = model.lm_head.output.save()
        true_logits, true_hidden = raw_run(raw, prompt, "transformer.h.0")
        torch.testing.assert_close(hidden, true_hidden, rtol=0, atol=TOL)
        torch.testing.assert_close(logits, true_logits, rtol=0, atol=TOL)
    assert _meta_only(model)  # nothing loaded here along the way


def test_hosted_model_has_the_servers_tree_config_and_tokenizer(use_server, tiny_gpt2_path, tiny_llama_path):
    for path in (tiny_gpt2_path, tiny_llama_path):
        hosted = LanguageModel(model_key=str(path))
        local = LanguageModel(str(path))
        assert type(hosted._module) is type(local._module)
        shapes = {n: (p.shape, p.dtype) for n, p in hosted._module.named_parameters()}
        assert shapes == {n: (p.shape, p.dtype) for n, p in local._module.named_parameters()}
        assert [n for n, _ in hosted._module.named_modules()] == [n for n, _ in local._module.named_modules()]
        assert hosted._module.config.to_dict().keys() == local._module.config.to_dict().keys()
        assert hosted._module.config.num_hidden_layers == local._module.config.num_hidden_layers
        for prompt in (SHORT, MSG_PROMPT):
            assert hosted.tokenizer(prompt)["input_ids"] == local.tokenizer(prompt)["input_ids"]
        assert hosted.tokenizer.padding_side == "left"
        assert not hosted._module.training
        assert _meta_only(hosted)


def test_meta_answer_carries_no_weights_and_no_code(use_server, tiny_gpt2_path):
    response = httpx.get(f"{use_server.url}/v1/models/{str(tiny_gpt2_path).replace('/', '%2F')}/meta",
                         headers={"X-Interlace-Key": use_server.key})
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["architecture"] == "GPT2LMHeadModel" and body["dtype"] == "float32"
    assert "config.json" in body["files"] and "tokenizer.json" in body["files"]
    assert not [n for n in body["files"] if n.endswith((".safetensors", ".bin", ".py", ".pt"))]
    assert len(response.content) < 2_000_000  # the tiny model's weights alone are larger


def test_hosted_language_model_invokes_with_position_dependent_edit(use_server, tiny_gpt2_path, raw):
    """Two invokes of different lengths, an edit that depends on the position: the hosted
    model's remote trace equals a local trace of the model loaded by path, and raw hooks."""
    hosted = LanguageModel(model_key=str(tiny_gpt2_path))
    local = LanguageModel(str(tiny_gpt2_path))

    def run(model, remote):
        with model.trace(remote=remote) as tracer:
            with tracer.invoke(ET_PROMPT):
                h1 = model.transformer.h[1].output
                h1[:, -1] = h1[:, -1] * 0.5 + 1.0
                a = model.lm_head.output[:, -1].save()
            with tracer.invoke(SHORT):
                b = model.transformer.h[2].output.save()
        return a, b

    a, b = run(hosted, True)
    la, lb = run(local, False)
    torch.testing.assert_close(a, la, rtol=0, atol=TOL)
    torch.testing.assert_close(b, lb, rtol=0, atol=TOL)

    def edit(out):
        out = out.clone()
        out[:, -1] = out[:, -1] * 0.5 + 1.0
        return out

    true_logits, _ = raw_run(raw, ET_PROMPT, "transformer.h.2", edit=edit)
    torch.testing.assert_close(a, true_logits[:, -1], rtol=0, atol=TOL)
    _, true_b = raw_run(raw, SHORT, "transformer.h.2")
    torch.testing.assert_close(b[:, -true_b.shape[1]:], true_b, rtol=0, atol=TOL)


def test_hosted_language_model_generates_on_the_server(use_server, tiny_gpt2_path, raw):
    hosted = LanguageModel(model_key=str(tiny_gpt2_path))
    with hosted.generate(ET_PROMPT, max_new_tokens=3, remote=True):
        ids = hosted.generator.output.save()
    model, tokenizer = raw
    inputs = tokenizer(ET_PROMPT, return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert torch.equal(ids, expected)
    assert _meta_only(hosted)


def test_hosted_language_model_scans_without_weights(use_server, tiny_gpt2_path, raw):
    """`scan` needs shapes only, so it runs here on the meta module."""
    hosted = LanguageModel(model_key=str(tiny_gpt2_path))
    with hosted.scan(ET_PROMPT):
        hidden = hosted.transformer.h[0].output.save()
    _, true_hidden = raw_run(raw, ET_PROMPT, "transformer.h.0")
    assert tuple(hidden.shape) == tuple(true_hidden.shape)


# -- RemoteBackend(model_key=...) ---------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["keyword", "positional"])
def test_remote_backend_with_model_key(use_server, tiny_gpt2_path, raw, spelling):
    from interlace.backends import RemoteBackend

    key = str(tiny_gpt2_path)
    backend = RemoteBackend(model_key=key) if spelling == "keyword" else RemoteBackend(key)
    assert backend.model_key == key
    for model in (NNsight(model_key=key), LanguageModel(key)):  # hosted-only, and loadable by path
        with model.trace(ET_PROMPT, backend=backend):
            hidden = model.transformer.h[3].output.save()
        _, true_hidden = raw_run(raw, ET_PROMPT, "transformer.h.3")
        torch.testing.assert_close(hidden, true_hidden, rtol=0, atol=TOL)
    assert not model.dispatched  # the backend ran it on the server: no local weights were loaded


def test_remote_backend_needs_a_key():
    from interlace.backends import RemoteBackend

    with pytest.raises(TypeError, match="model_key"):
        RemoteBackend(model_key="")


# -- no local weights: a clear error, never a download -------------------------------------------


@pytest.mark.parametrize("remote", [False, "local"], ids=["local-run", "simulated"])
def test_hosted_model_refuses_local_runs(use_server, tiny_gpt2_path, remote):
    for model in (NNsight(model_key=str(tiny_gpt2_path)), LanguageModel(model_key=str(tiny_gpt2_path))):
        with pytest.raises(HostedModelError) as info:
            with model.trace(SHORT, remote=remote):
                hidden = model.transformer.h[0].output.save()
        text = str(info.value)
        assert "no weights" in text and "remote=True" in text and "dry_run=True" in text
        assert repr(remote) in text
        with pytest.raises(HostedModelError, match="no weights"):
            with model.session(remote=remote):
                pass
        assert _meta_only(model)


def test_hosted_model_refuses_dispatch_and_explicit_local_backend(use_server, tiny_gpt2_path):
    from interlace.backends import LocalBackend

    key = str(tiny_gpt2_path)
    lm = LanguageModel(model_key=key)
    with pytest.raises(HostedModelError, match="no weights"):
        lm.dispatch()
    with pytest.raises(HostedModelError, match="no weights"):
        with lm.generate(SHORT, max_new_tokens=2):
            out = lm.generator.output.save()
    with pytest.raises(HostedModelError, match="no weights"):
        LanguageModel(model_key=key, dispatch=True)
    model = NNsight(model_key=key)
    with pytest.raises(HostedModelError, match="no weights"):
        with model.trace(SHORT, backend=LocalBackend()):
            hidden = model.transformer.h[0].output.save()
    assert _meta_only(lm) and _meta_only(model)


def test_loading_options_do_not_apply_to_a_hosted_model(use_server, tiny_gpt2_path):
    with pytest.raises(TypeError, match="torch_dtype.*model_key="):
        LanguageModel(model_key=str(tiny_gpt2_path), torch_dtype=torch.float16)


def test_constructors_without_a_model_or_key_say_how():
    with pytest.raises(TypeError, match=r"NNsight\(model_key="):
        NNsight()
    with pytest.raises(TypeError, match=r"NNsight\(model_key='gpt2'\)"):
        NNsight("gpt2")
    with pytest.raises(TypeError, match=r"LanguageModel\(model_key="):
        LanguageModel()


# -- what the server refuses ------------------------------------------------------------------


def test_unknown_key_is_a_404_naming_the_hosted_models(use_server, tiny_gpt2_path, tiny_llama_path):
    with pytest.raises(RemoteRequestError) as info:
        NNsight(model_key="org/not-hosted")
    assert info.value.status_code == 404
    text = str(info.value)
    assert "'org/not-hosted'" in text and "not hosted" in text
    assert repr(str(tiny_gpt2_path)) in text and repr(str(tiny_llama_path)) in text


def test_meta_needs_a_valid_key(use_server, tiny_gpt2_path, monkeypatch):
    url = f"{use_server.url}/v1/models/{str(tiny_gpt2_path).replace('/', '%2F')}/meta"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"X-Interlace-Key": "not-a-key"}).status_code == 401
    assert httpx.get(url, headers={"X-Interlace-Key": use_server.other_key}).status_code == 200
    with pytest.raises(RemoteRequestError) as info:
        NNsight(model_key=str(tiny_gpt2_path), api_key="not-a-key")
    assert info.value.status_code == 401 and "X-Interlace-Key" in str(info.value)
    monkeypatch.setattr(interlace.CONFIG.API, "APIKEY", "")
    monkeypatch.delenv("INTERLACE_API_KEY", raising=False)
    with pytest.raises(RemoteRequestError) as info:
        LanguageModel(model_key=str(tiny_gpt2_path))
    assert info.value.status_code == 401


def test_host_given_to_the_model_is_where_its_traces_go(use_server, tiny_gpt2_path, raw, monkeypatch):
    """A model built from `host=` traces there even when CONFIG points elsewhere."""
    model = NNsight(model_key=str(tiny_gpt2_path), host=use_server.url, api_key=use_server.key)
    monkeypatch.setattr(interlace.CONFIG.API, "HOST", "http://127.0.0.1:9")  # nothing listens
    monkeypatch.setattr(interlace.CONFIG.API, "APIKEY", "")
    with model.trace(SHORT, remote=True):
        hidden = model.transformer.h[1].output.save()
    _, true_hidden = raw_run(raw, SHORT, "transformer.h.1")
    torch.testing.assert_close(hidden, true_hidden, rtol=0, atol=TOL)


def test_server_without_described_models_says_so(tmp_path):
    """A runner that cannot describe its models (the test fake) answers 409, not a 500."""
    from interlace.testing import ThreadedServer

    with ThreadedServer(tmp_path, models=["fake"]) as server:
        key = server.create_key("alice")
        response = httpx.get(f"{server.url}/v1/models/fake/meta", headers={"X-Interlace-Key": key})
        assert response.status_code == 409 and "cannot describe 'fake'" in response.json()["detail"]
        response = httpx.get(f"{server.url}/v1/models/other/meta", headers={"X-Interlace-Key": key})
        assert response.status_code == 404 and "'fake'" in response.json()["detail"]


def test_module_methods_on_a_hosted_model_stay_without_weights(use_server, tiny_gpt2_path, raw):
    """`.to(...)`, `.half()`, `.eval()` return the wrapper and keep the meta module (nothing
    to move here); the model still traces on the server."""
    model = NNsight(model_key=str(tiny_gpt2_path))
    assert model.to("cpu").half().eval() is model
    assert all(p.dtype is torch.float16 for p in model._module.parameters())
    assert _meta_only(model)
    with model.trace(SHORT, remote=True):
        hidden = model.transformer.h[0].output.save()
    _, true_hidden = raw_run(raw, SHORT, "transformer.h.0")
    torch.testing.assert_close(hidden, true_hidden, rtol=0, atol=TOL)


def test_hosted_llama_traces_on_the_server(use_server, tiny_llama_path):
    """Grouped-query attention and rotary buffers built on the meta device: same values as a
    local trace of the model loaded by path, for two prompts of different lengths."""
    hosted = LanguageModel(model_key=str(tiny_llama_path))
    local = LanguageModel(str(tiny_llama_path))
    for prompt in (SHORT, MSG_PROMPT):
        results = []
        for model, remote in ((hosted, True), (local, False)):
            with model.trace(prompt, remote=remote):
                model.model.layers[0].output[:, 0] *= 2.0
                hidden = model.model.layers[1].output.save()
                logits = model.lm_head.output.save()
            results.append((hidden, logits))
        (h, l), (lh, ll) = results
        assert h.shape[1] == len(local.tokenizer(prompt)["input_ids"])
        torch.testing.assert_close(h, lh, rtol=0, atol=TOL)
        torch.testing.assert_close(l, ll, rtol=0, atol=TOL)


# -- the description itself, offline -------------------------------------------------------------


def test_description_round_trip_keeps_class_dtype_and_tokenizer(tiny_gpt2_path):
    """What the server describes (here a bfloat16 copy) is what the client builds."""
    from interlace.models.hosted import build_hosted
    from interlace.contract.model_meta import describe_model

    served = LanguageModel(str(tiny_gpt2_path), dispatch=True).bfloat16()
    meta = describe_model(served)
    assert meta["dtype"] == "bfloat16"
    built = build_hosted("k", meta, host="http://server")
    assert type(built.module) is type(served._module)
    assert {p.dtype for p in built.module.parameters()} == {torch.bfloat16}
    assert built.tokenizer(ET_PROMPT)["input_ids"] == served.tokenizer(ET_PROMPT)["input_ids"]
    with pytest.raises(HostedModelError, match="format"):
        build_hosted("k", {**meta, "format": 99}, host="http://server")


def test_only_plain_non_code_files_are_written(tmp_path):
    """Whatever a server sends, the client writes single plain file names only: no paths,
    no hidden files, no code, no weights."""
    from interlace.models.hosted import _write_files

    folder = tmp_path / "in"
    folder.mkdir()
    files = {
        "config.json": {"text": "{}"},
        "../outside.json": {"text": "x"},
        "sub/dir.json": {"text": "x"},
        ".hidden": {"text": "x"},
        "modeling_evil.py": {"text": "import os"},
        "model.safetensors": {"base64": "AAAA"},
        "spiece.model": {"base64": "AAEC"},
    }
    _write_files(folder, files, "k", "http://server")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "spiece.model"]
    assert (folder / "spiece.model").read_bytes() == b"\x00\x01\x02"
    assert not (tmp_path / "outside.json").exists()


def test_a_model_known_only_by_its_key_takes_a_dry_run(use_server, tiny_gpt2_path):
    """The model too big to load: built on the meta device from the server's config, it can
    still check a trace meant for the server (shapes from the architecture, values fake)."""
    import warnings

    from interlace.backends.dry_run import FakeValueError

    hosted = LanguageModel(model_key=str(tiny_gpt2_path))
    local = LanguageModel(str(tiny_gpt2_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with hosted.trace(ET_PROMPT, remote="local", dry_run=True):
            fake = hosted.transformer.h[1].output.save()
    with local.trace(ET_PROMPT):
        real = local.transformer.h[1].output.save()
    assert tuple(fake.shape) == tuple(real.shape) and fake.dtype == real.dtype
    with pytest.raises(FakeValueError):
        fake.tolist()
    assert all(p.device.type == "meta" for p in hosted._module.parameters())
    with pytest.raises(interlace.InterlaceError, match="remote=True"):
        with hosted.trace(ET_PROMPT, remote="local"):  # without dry_run: still no weights here
            hosted.transformer.h[1].output.save()
