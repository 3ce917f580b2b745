"""Deterministic tiny models and a tokenizer, built offline.

Model hubs are not reachable where Interlace is developed and tested, so every model the
tests, benchmarks and the demo server use is built here from fixed seeds: random weights,
a byte-level BPE tokenizer trained on a small built-in English corpus, saved in the usual
Hugging Face layout so ``AutoModelForCausalLM.from_pretrained(path)`` and
``AutoTokenizer.from_pretrained(path)`` load them like any hub model.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BUILD_VERSION",
    "DEMO_MODEL_KEY",
    "EOT_TOKEN",
    "MARKER_FILE",
    "build_corpus",
    "build_demo_model",
    "build_gpt2_small_shape",
    "build_tiny_gpt2",
    "build_tiny_llama",
    "build_tiny_mlp",
    "train_byte_bpe_tokenizer",
]

#: Key under which the server hosts the built-in demo model.
DEMO_MODEL_KEY = "interlace/demo-gpt2"

#: GPT-2's single special token: beginning, end and padding of text all at once.
EOT_TOKEN = "<|endoftext|>"

#: Written last into a built model directory; its presence with matching parameters means
#: the directory is complete and need not be rebuilt.
MARKER_FILE = "interlace_build.json"

#: Bump whenever the recipe (corpus, tokenizer settings, config defaults) changes, so that
#: cached directories built by an older recipe are rebuilt rather than silently reused.
BUILD_VERSION = 1

# Files a complete directory must hold besides the marker.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


# --------------------------------------------------------------------------- corpus

_FIXED_SENTENCES: tuple[str, ...] = (
    "Hello world",
    "Hello world!",
    "Hello, world. Hello again, world.",
    "The Eiffel Tower is in Paris.",
    "The Eiffel Tower is in the city of Paris.",
    "Madison Square Garden is located in the city of New York.",
    "The Colosseum is in the city of Rome.",
    "Big Ben is located in the city of London.",
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "To be, or not to be, that is the question.",
    "All that glitters is not gold.",
    "It was the best of times, it was the worst of times.",
    "Call me Ishmael.",
    "In the beginning was the word.",
    "She sells sea shells by the sea shore.",
    "Time flies like an arrow; fruit flies like a banana.",
    "Colorless green ideas sleep furiously.",
    "The rain in Spain stays mainly in the plain.",
    "Once upon a time, there was a little girl who lived in a village near the forest.",
    "Whenever she went out, the little girl wore a red riding cloak.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Water boils at 100 degrees Celsius and freezes at 0 degrees.",
    "There are 7 days in a week, 12 months in a year and 365 days in most years.",
    "The answer is 42.",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "import torch\nx = torch.zeros(3, 4)\n",
    'print("Hello world")',
    "Q: What is the tallest mountain on Earth? A: Mount Everest.",
    "Q: Where is the Eiffel Tower? A: Paris.",
    "Q: Where is Madison Square Garden? A: New York.",
    "Neural networks learn representations from data.",
    "The model predicts the next token given the previous tokens.",
    "Attention is all you need.",
    "Interlace lets you look inside a model and change what happens there.",
    "Researchers study how language models store facts about the world.",
    "The cat sat on the mat. The dog sat on the log.",
    "I think, therefore I am.",
    "Knowledge is power.",
    "The sun rises in the east and sets in the west.",
    "Please remember to bring an umbrella; it might rain later today.",
    "He said: \"I'll be there at 5 o'clock.\" She replied: 'Don't be late!'",
    "Email me at someone@example.com or visit https://example.com/docs?page=2.",
    "Prices rose by 3.5% in 2023, compared with 2.1% in 2022.",
)

# Landmark -> city pairs for factual-recall style sentences (the classic patching prompts).
_LANDMARKS: tuple[tuple[str, str], ...] = (
    ("The Eiffel Tower", "Paris"),
    ("Madison Square Garden", "New York"),
    ("The Colosseum", "Rome"),
    ("Big Ben", "London"),
    ("The Brandenburg Gate", "Berlin"),
    ("The Sagrada Familia", "Barcelona"),
    ("The Statue of Liberty", "New York"),
    ("The Louvre", "Paris"),
    ("The Space Needle", "Seattle"),
    ("The Golden Gate Bridge", "San Francisco"),
    ("The Sydney Opera House", "Sydney"),
    ("The Kremlin", "Moscow"),
    ("The Acropolis", "Athens"),
    ("The Forbidden City", "Beijing"),
    ("Tokyo Tower", "Tokyo"),
    ("The CN Tower", "Toronto"),
    ("The Rijksmuseum", "Amsterdam"),
    ("The Prado Museum", "Madrid"),
    ("Wembley Stadium", "London"),
    ("The Empire State Building", "New York"),
)

_LANDMARK_TEMPLATES: tuple[str, ...] = (
    "{landmark} is in the city of {city}.",
    "{landmark} is located in the city of {city}.",
    "{landmark} is in {city}.",
    "You can visit {landmark} in {city}.",
    "Tourists travel to {city} to see {landmark}.",
    "{landmark}, in {city}, is famous around the world.",
)

_NAMES = ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Isabel", "John",
          "Mary", "Paul", "Sarah", "Tom")
_JOBS = ("a teacher", "a doctor", "an engineer", "a painter", "a farmer", "a pilot", "a writer",
         "a nurse", "a chef", "a scientist")
_ANIMALS = ("cat", "dog", "horse", "bird", "fish", "rabbit", "mouse", "lion", "bear", "fox")
_COLORS = ("red", "green", "blue", "yellow", "black", "white", "brown", "orange", "purple")
_VERBS = ("likes", "sees", "follows", "chases", "watches", "finds", "feeds", "draws")
_PLACES = ("the park", "the garden", "the kitchen", "the station", "the library", "the market",
           "the river", "the school", "the museum", "the forest")
_TIMES = ("In the morning", "In the evening", "Yesterday", "Today", "On Sunday", "Last year",
          "Every day", "At night")


@functools.cache
def build_corpus(seed: int = 0) -> tuple[str, ...]:
    """The built-in English training corpus: a few hundred varied sentences.

    Generated from fixed lists with ``random.Random(seed)`` so it is identical on every run
    and every platform (``random.Random`` with an int seed is specified to be stable).
    """
    rng = random.Random(seed)
    sentences: list[str] = list(_FIXED_SENTENCES)
    # Every landmark with every template: the factual prompts must tokenize into whole words.
    for landmark, city in _LANDMARKS:
        for template in _LANDMARK_TEMPLATES:
            sentences.append(template.format(landmark=landmark, city=city))
    for _ in range(120):
        sentences.append(
            f"{rng.choice(_TIMES)}, {rng.choice(_NAMES)}, who is {rng.choice(_JOBS)}, "
            f"{rng.choice(_VERBS)} the {rng.choice(_COLORS)} {rng.choice(_ANIMALS)} "
            f"in {rng.choice(_PLACES)}."
        )
    for _ in range(60):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        sentences.append(f"{a} plus {b} is {a + b}, and {a} times 2 is {2 * a}.")
    for _ in range(60):
        sentences.append(
            f"The {rng.choice(_ANIMALS)} is {rng.choice(_COLORS)}. "
            f"My name is {rng.choice(_NAMES)} and I live near {rng.choice(_PLACES)}."
        )
    rng.shuffle(sentences)
    return tuple(sentences)


# ------------------------------------------------------------------------ tokenizer

@functools.cache
def _tokenizer_json(vocab_size: int, seed: int) -> str:
    """Train once per (vocab_size, seed) and cache the serialized tokenizer.

    The cache holds a string, not a tokenizer object, because callers mutate tokenizers
    (e.g. set a pad token); each call gets a fresh object.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + {EOT_TOKEN}), got {vocab_size}")
    # Same pipeline as GPT-2's tokenizer.json: byte-level pre-tokenizer, decoder and
    # post-processor, no prefix space, so "Hello world" decodes back exactly.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        special_tokens=[EOT_TOKEN],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
        show_progress=False,
    )
    tok.train_from_iterator(build_corpus(seed), trainer=trainer)
    return tok.to_str()


def train_byte_bpe_tokenizer(vocab_size: int = 512, seed: int = 0) -> Any:
    """A GPT-2 style byte-level BPE tokenizer trained on the built-in corpus.

    ``<|endoftext|>`` is bos, eos and unk (as in GPT-2); no pad token is set. Returns a
    ``transformers.PreTrainedTokenizerFast``; the same arguments give the same vocabulary.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_tokenizer_json(vocab_size, seed))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOT_TOKEN,
        eos_token=EOT_TOKEN,
        unk_token=EOT_TOKEN,
        clean_up_tokenization_spaces=False,  # keep decode(encode(s)) == s
    )


# ------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for the block without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide transformers' per-save progress bars, which are noise in test output."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _marker(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"builder": kind, "build_version": BUILD_VERSION, "params": params}


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_complete(path: Path, marker: dict[str, Any]) -> bool:
    return _read_marker(path) == marker and all((path / f).is_file() for f in _REQUIRED_FILES)


def _build_dir(path: str | os.PathLike[str], marker: dict[str, Any], save: Any) -> Path:
    """Build into a sibling temp dir and rename it into place.

    The rename makes the build atomic: a crash leaves no half-written model at ``path``, and
    concurrent builders (parallel test sessions sharing INTERLACE_TEST_MODELS_DIR) either
    win the rename or find the winner's identical result.
    """
    path = Path(path).expanduser().resolve()
    if _is_complete(path, marker):
        return path
    if path.exists():
        # Only replace what is recognisably ours (an older build) or empty; never a
        # directory that happens to be at a mistaken path.
        if not path.is_dir() or (_read_marker(path) is None and any(path.iterdir())):
            raise FileExistsError(f"{path} exists and is not an Interlace-built model; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        save(tmp)
        # Marker last: its presence certifies the rest of the directory.
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if _is_complete(path, marker):
            return path  # a concurrent builder finished first; keep its (identical) result
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        try:
            tmp.rename(path)
        except OSError:
            if not _is_complete(path, marker):  # lost a race to a different build: real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _save_model_and_tokenizer(model: Any, tokenizer: Any, target: Path) -> None:
    with _quiet_progress():
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
    # transformers does not serialize the attention implementation; writing it into
    # config.json makes from_pretrained(path) pick eager (simple, hookable, deterministic
    # ops) instead of sdpa. An explicit attn_implementation= at load time still wins.
    cfg_file = target / "config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    cfg["attn_implementation"] = "eager"
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _finish(model: Any, eot_id: int) -> Any:
    """Eval mode plus a generation config that needs no pad-token warning."""
    model.eval()
    gen = model.generation_config
    gen.bos_token_id = eot_id
    gen.eos_token_id = eot_id
    gen.pad_token_id = eot_id  # what LanguageModel uses as pad, too
    return model


# -------------------------------------------------------------------------- models

def build_tiny_gpt2(
    path: str | os.PathLike[str],
    *,
    n_layer: int = 4,
    n_embd: int = 128,
    n_head: int = 4,
    n_positions: int = 256,
    vocab_size: int = 512,
    seed: int = 0,
) -> Path:
    """Build (or reuse) a random-weight GPT-2 plus tokenizer at ``path``; return the path."""
    params = dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                  vocab_size=vocab_size, seed=seed)

    def save(target: Path) -> None:
        from transformers import GPT2Config, GPT2LMHeadModel

        tokenizer = train_byte_bpe_tokenizer(vocab_size, seed)
        tokenizer.model_max_length = n_positions
        eot = tokenizer.convert_tokens_to_ids(EOT_TOKEN)
        config = GPT2Config(
            vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
            n_head=n_head, bos_token_id=eot, eos_token_id=eot,
            # No dropout: the model behaves identically even if someone calls .train().
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
            attn_implementation="eager",
        )
        with _seeded(seed):
            model = GPT2LMHeadModel(config)
        _save_model_and_tokenizer(_finish(model, eot), tokenizer, target)

    return _build_dir(path, _marker("gpt2", params), save)


def build_tiny_llama(
    path: str | os.PathLike[str],
    *,
    num_hidden_layers: int = 2,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int = 512,
    max_position_embeddings: int = 256,
    seed: int = 0,
) -> Path:
    """Build (or reuse) a random-weight Llama (grouped-query attention) plus tokenizer."""
    params = dict(num_hidden_layers=num_hidden_layers, hidden_size=hidden_size,
                  intermediate_size=intermediate_size, num_attention_heads=num_attention_heads,
                  num_key_value_heads=num_key_value_heads, vocab_size=vocab_size,
                  max_position_embeddings=max_position_embeddings, seed=seed)

    def save(target: Path) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = train_byte_bpe_tokenizer(vocab_size, seed)
        tokenizer.model_max_length = max_position_embeddings
        eot = tokenizer.convert_tokens_to_ids(EOT_TOKEN)
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            max_position_embeddings=max_position_embeddings,
            bos_token_id=eot, eos_token_id=eot, pad_token_id=None,
            attn_implementation="eager",
        )
        with _seeded(seed):
            model = LlamaForCausalLM(config)
        _save_model_and_tokenizer(_finish(model, eot), tokenizer, target)

    return _build_dir(path, _marker("llama", params), save)


def build_demo_model(data_dir: str | os.PathLike[str]) -> Path:
    """The model the server hosts by default (``DEMO_MODEL_KEY``): GPT-2, 4 layers x 128."""
    return build_tiny_gpt2(Path(data_dir) / "models" / "demo-gpt2", n_layer=4, n_embd=128, n_head=4)


def build_gpt2_small_shape(seed: int = 0) -> Any:
    """An in-memory GPT-2 with gpt2-small's shapes (12 x 768, 12 heads, vocab 50257).

    Random weights, eval mode; for benchmarks, where realistic sizes matter but trained
    weights do not. Returns a ``GPT2LMHeadModel``.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
        attn_implementation="eager",
    )
    with _seeded(seed):
        model = GPT2LMHeadModel(config)
    return _finish(model, config.eos_token_id)


def build_tiny_mlp(seed: int = 0) -> torch.nn.Sequential:
    """Linear(5, 10) -> ReLU -> Linear(10, 2), children named layer1, act, layer2."""
    with _seeded(seed):
        model = torch.nn.Sequential(
            OrderedDict(
                [
                    ("layer1", torch.nn.Linear(5, 10)),
                    ("act", torch.nn.ReLU()),
                    ("layer2", torch.nn.Linear(10, 2)),
                ]
            )
        )
    return model.eval()
