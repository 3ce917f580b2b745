"""The offline tiny models are deterministic, loadable by path, and generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from interlace.models import demo


def _assert_same_build(a: Path, b: Path) -> None:
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    assert AutoTokenizer.from_pretrained(a).get_vocab() == AutoTokenizer.from_pretrained(b).get_vocab()


@pytest.mark.parametrize("builder", [demo.build_tiny_gpt2, demo.build_tiny_llama])
def test_builds_are_deterministic(builder, tmp_path: Path) -> None:
    _assert_same_build(builder(tmp_path / "a"), builder(tmp_path / "b"))


def test_different_seed_gives_different_weights(tmp_path: Path) -> None:
    a = load_file(demo.build_tiny_gpt2(tmp_path / "a", n_layer=1, seed=0) / "model.safetensors")
    b = load_file(demo.build_tiny_gpt2(tmp_path / "b", n_layer=1, seed=1) / "model.safetensors")
    assert not torch.equal(a["transformer.wte.weight"], b["transformer.wte.weight"])


def test_building_leaves_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    demo.build_tiny_llama(tmp_path / "l")
    demo.build_tiny_mlp()
    assert torch.equal(before, torch.get_rng_state())


def test_build_is_idempotent_and_rebuilds_on_new_params(tmp_path: Path) -> None:
    path = demo.build_tiny_gpt2(tmp_path / "g", n_layer=1)
    marker = path / demo.MARKER_FILE
    stamp = marker.stat().st_mtime_ns
    assert demo.build_tiny_gpt2(tmp_path / "g", n_layer=1) == path
    assert marker.stat().st_mtime_ns == stamp  # reused, not rebuilt

    demo.build_tiny_gpt2(tmp_path / "g", n_layer=2)
    assert json.loads(marker.read_text())["params"]["n_layer"] == 2
    assert AutoModelForCausalLM.from_pretrained(path).config.n_layer == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_refuses_to_overwrite_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        demo.build_tiny_gpt2(tmp_path / "x")
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("fixture", "model_type"), [("tiny_gpt2_path", "gpt2"), ("tiny_llama_path", "llama")]
)
def test_load_by_path(fixture: str, model_type: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == model_type
    assert model.config._attn_implementation == "eager"  # from config.json, not the sdpa default
    assert not model.training
    assert model.config.vocab_size == 512 and len(tokenizer) == 512
    assert tokenizer.eos_token == tokenizer.bos_token == demo.EOT_TOKEN
    assert tokenizer.pad_token is None  # LanguageModel sets pad = eos itself
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.eos_token_id


@pytest.mark.parametrize("fixture", ["tiny_gpt2_path", "tiny_llama_path"])
def test_generate(fixture: str, request: pytest.FixtureRequest, et_prompt: str) -> None:
    path = request.getfixturevalue(fixture)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(et_prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 5)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    assert torch.equal(out, model.generate(ids, max_new_tokens=5, do_sample=False))


@pytest.mark.parametrize(
    "text", ["Hello world", "The Eiffel Tower is in Paris", "  spaces\tand\nnewlines ", "naïve café 東京 🙂"]
)
def test_tokenizer_roundtrip(text: str, tiny_gpt2_path: Path) -> None:
    for tokenizer in (demo.train_byte_bpe_tokenizer(), AutoTokenizer.from_pretrained(tiny_gpt2_path)):
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids  # byte-level: every string is encodable
        assert tokenizer.decode(ids) == text


def test_tokenizer_is_fresh_and_deterministic() -> None:
    a, b = demo.train_byte_bpe_tokenizer(), demo.train_byte_bpe_tokenizer()
    a.pad_token = a.eos_token
    assert b.pad_token is None  # callers may mutate their copy
    assert a.get_vocab() == b.get_vocab()
    assert a.convert_tokens_to_ids(demo.EOT_TOKEN) == 0


def test_prompts_fit_the_model(tiny_gpt2_path: Path, et_prompt: str, msg_prompt: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_path)
    for prompt in (et_prompt, msg_prompt):
        ids = tokenizer(prompt)["input_ids"]
        assert 0 < len(ids) < tokenizer.model_max_length
        assert tokenizer.decode(ids) == prompt


def test_demo_model(tmp_path: Path) -> None:
    assert demo.DEMO_MODEL_KEY == "interlace/demo-gpt2"
    path = demo.build_demo_model(tmp_path)
    assert path == (tmp_path / "models" / "demo-gpt2").resolve()
    config = AutoModelForCausalLM.from_pretrained(path).config
    assert (config.n_layer, config.n_embd) == (4, 128)


def test_tiny_mlp(tiny_mlp: torch.nn.Sequential, tiny_input: torch.Tensor) -> None:
    assert [name for name, _ in tiny_mlp.named_children()] == ["layer1", "act", "layer2"]
    assert (tiny_mlp.layer1.in_features, tiny_mlp.layer1.out_features) == (5, 10)
    assert isinstance(tiny_mlp.act, torch.nn.ReLU)
    assert (tiny_mlp.layer2.in_features, tiny_mlp.layer2.out_features) == (10, 2)
    assert tiny_mlp(tiny_input).shape == (1, 2)
    fresh = demo.build_tiny_mlp()
    for (name, p), q in zip(tiny_mlp.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(p, q), name


def test_gpt2_small_shape() -> None:
    model = demo.build_gpt2_small_shape()
    config = model.config
    assert (config.n_layer, config.n_embd, config.n_head, config.vocab_size) == (12, 768, 12, 50257)
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == 124_439_808  # gpt2-small's count
