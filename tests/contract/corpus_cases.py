"""Trace corpus for the one-contract invariant: each case runs under a given `remote=` mode.

Passing cases return their saved values; the test runs them locally and with
remote='local' and compares. Failing cases mark the offending line with `# <- ERR`.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import math
import pathlib
import socket
import subprocess
import threading

import numpy as np
import torch
import torch.nn.functional as F

import interlace
from interlace import remote

PROMPT = "The Eiffel Tower is in the city of"
SCALE = 0.5
TABLE = {"a": 1, "b": [1, 2, 3]}


@remote
def normalize(x):
    return x / x.norm(dim=-1, keepdim=True)


@remote
def scaled(x):
    return x * SCALE  # module-level constant travels by value


def plain_helper(x):
    return x.mean(-1)


def fact(n):
    return 1 if n <= 1 else n * fact(n - 1)


def is_even(n):
    return n == 0 or is_odd(n - 1)


def is_odd(n):
    return n != 0 and is_even(n - 1)


class Probe:
    def __init__(self, layer):
        self.layer = layer

    def read(self, h):
        return h[..., : self.layer + 1].sum(-1)


@dataclasses.dataclass
class Config:
    layer: int
    factor: float = 2.0


class Mode(enum.Enum):
    ZERO = "zero"
    KEEP = "keep"


def make_scaler(k):
    def inner(x):
        return x * k

    return inner


# -- passing cases -------------------------------------------------------------------------------


def p_save_hidden(model, mode):
    with model.trace(PROMPT, remote=mode):
        h = model.transformer.h[0].output.save()
    return {"h": h}


def p_save_logits(model, mode):
    with model.trace(PROMPT, remote=mode):
        logits = model.lm_head.output.save()
    return {"logits": logits}


def p_inplace_edit(model, mode):
    with model.trace(PROMPT, remote=mode):
        # Position-dependent (a zero edit makes every position alike and would hide misrouting).
        model.transformer.h[1].output[:] *= torch.linspace(0.2, 1.0, model.transformer.h[1].output.shape[1])[:, None]
        logits = model.lm_head.output.save()
    return {"logits": logits}


def p_replace(model, mode):
    with model.trace(PROMPT, remote=mode):
        model.transformer.h[0].output = model.transformer.h[0].output * 2
        out = model.transformer.h[1].output.save()
    return {"out": out}


def p_json_vars(model, mode):
    layer, weights, cfg = 2, [0.5, 1.5], {"k": 3, "name": "x"}
    with model.trace(PROMPT, remote=mode):
        h = (model.transformer.h[layer].output * weights[1] * cfg["k"]).save()
    return {"h": h}


def p_tensor_var(model, mode):
    torch.manual_seed(0)
    delta = torch.randn(128)
    with model.trace(PROMPT, remote=mode):
        model.transformer.h[0].output[:] += delta
        out = model.lm_head.output.save()
    return {"out": out}


def p_numpy_var(model, mode):
    arr = np.arange(128, dtype=np.float32)
    with model.trace(PROMPT, remote=mode):
        out = (model.transformer.h[0].output + torch.from_numpy(arr)).save()
    return {"out": out}


def p_remote_function(model, mode):
    with model.trace(PROMPT, remote=mode):
        n = normalize(model.transformer.h[0].output).save()
    return {"n": n}


def p_module_constant(model, mode):
    with model.trace(PROMPT, remote=mode):
        s = scaled(model.transformer.h[0].output).save()
    return {"s": s}


def p_plain_function(model, mode):
    with model.trace(PROMPT, remote=mode):
        m = plain_helper(model.transformer.h[0].output).save()
    return {"m": m}


def p_class_instance(model, mode):
    probe = Probe(3)
    with model.trace(PROMPT, remote=mode):
        r = probe.read(model.transformer.h[0].output).save()
    return {"r": r}


def p_dataclass(model, mode):
    cfg = Config(layer=1, factor=3.0)
    with model.trace(PROMPT, remote=mode):
        h = (model.transformer.h[cfg.layer].output * cfg.factor).save()
    return {"h": h}


def p_enum(model, mode):
    choice = Mode.ZERO
    with model.trace(PROMPT, remote=mode):
        if choice == Mode.ZERO:
            model.transformer.h[0].output[:, -1] = 0
        out = model.lm_head.output.save()
    return {"out": out}


def p_lambda(model, mode):
    double = lambda x: x * 2  # noqa: E731
    with model.trace(PROMPT, remote=mode):
        d = double(model.transformer.h[0].output).save()
    return {"d": d}


def p_closure(model, mode):
    triple = make_scaler(3)
    with model.trace(PROMPT, remote=mode):
        t = triple(model.transformer.h[0].output).save()
    return {"t": t}


def p_recursion(model, mode):
    with model.trace(PROMPT, remote=mode):
        k = fact(5)
        even = is_even(10)
        h = (model.transformer.h[0].output * k).save()
        flag = interlace.save(even)
    return {"h": h, "flag": flag}


def p_math_module(model, mode):
    with model.trace(PROMPT, remote=mode):
        h = (model.transformer.h[0].output * math.sqrt(4)).save()
    return {"h": h}


def p_functional_ref(model, mode):
    with model.trace(PROMPT, remote=mode):
        probs = F.softmax(model.lm_head.output, dim=-1).save()
    return {"probs": probs}


def p_loop(model, mode):
    with model.trace(PROMPT, remote=mode):
        norms = interlace.save([])
        for layer in model.transformer.h:
            norms.append(layer.output.norm())
    return {"norms": torch.stack(norms)}


def p_conditional(model, mode):
    threshold = 1e9
    with model.trace(PROMPT, remote=mode):
        h = model.transformer.h[0].output
        if h.abs().max() < threshold:
            model.transformer.h[1].output[:] = 1
        out = model.transformer.h[1].output.save()
    return {"out": out}


def p_invokes(model, mode):
    with model.trace(remote=mode) as tracer:
        with tracer.invoke("Hello world"):
            a = model.lm_head.output.save()
        with tracer.invoke(PROMPT):
            b = model.lm_head.output.save()
    return {"a": a, "b": b}


def p_session(model, mode):
    with model.session(remote=mode):
        with model.trace(PROMPT):
            h = model.transformer.h[0].output.clone()
        with model.trace("Hello world"):
            model.transformer.h[0].output[:, -1] = h[:, -1]
            out = model.lm_head.output.save()
    return {"out": out}


def p_generate(model, mode):
    with model.generate(PROMPT, max_new_tokens=3, do_sample=False, remote=mode) as tracer:
        toks = interlace.save([])
        for _ in tracer.iter[:]:
            toks.append(model.lm_head.output[:, -1].argmax(-1))
        ids = model.generator.output.save()
    return {"ids": ids, "toks": torch.stack(toks)}


def p_stop(model, mode):
    with model.trace(PROMPT, remote=mode) as tracer:
        h = model.transformer.h[0].output.save()
        tracer.stop()
    return {"h": h}


def p_skip(model, mode):
    with model.trace(PROMPT, remote=mode):
        model.transformer.h[1].skip(model.transformer.h[0].output)
        out = model.transformer.h[1].output.save()
    return {"out": out}


def p_logit_lens(model, mode):
    with model.trace(PROMPT, remote=mode):
        lens = model.lm_head(model.transformer.ln_f(model.transformer.h[1].output)).save()
    return {"lens": lens}


def p_odd_containers(model, mode):
    keys = {(0, 1): "pair", 2: "two"}
    with model.trace(PROMPT, remote=mode):
        n = interlace.save(len(keys) + sum(k for k in keys if isinstance(k, int)))
    return {"n": torch.tensor(n)}


def p_bfloat16_var(model, mode):
    delta = torch.ones(128, dtype=torch.bfloat16)
    with model.trace(PROMPT, remote=mode):
        out = (model.transformer.h[0].output + delta.float()).save()
    return {"out": out}


def p_token_ids_input(model, mode):
    ids = torch.tensor([[5, 6, 7, 8]])
    with model.trace(ids, remote=mode):
        out = model.lm_head.output.save()
    return {"out": out}


PASSING = [v for k, v in sorted(globals().items()) if k.startswith("p_")]


# -- failing cases: (function, expected category) --------------------------------------------------


def f_unserializable(model, mode):
    lock = threading.Lock()
    with model.trace(PROMPT, remote=mode):
        with lock:  # <- ERR
            h = model.transformer.h[0].output.save()


def f_module_not_allowed(model, mode):
    with model.trace(PROMPT, remote=mode):
        dialect = csv.excel  # <- ERR
        h = model.transformer.h[0].output.save()


def f_lambda_capture(model, mode):
    reader = lambda rows: csv.reader(rows)  # noqa: E731  # <- ERR
    with model.trace(PROMPT, remote=mode):
        r = reader([])
        h = model.transformer.h[0].output.save()


def f_undecorated_function(model, mode):
    with model.trace(PROMPT, remote=mode, strict_remote=True):
        m = plain_helper(model.transformer.h[0].output).save()  # <- ERR


def f_undecorated_class(model, mode):
    probe = Probe(2)
    with model.trace(PROMPT, remote=mode, strict_remote=True):
        r = probe.read(model.transformer.h[0].output).save()  # <- ERR


def f_source_unavailable(model, mode):
    made = eval("lambda x: x + 1")
    with model.trace(PROMPT, remote=mode):
        h = made(model.transformer.h[0].output).save()  # <- ERR


def f_file_io(model, mode):
    with model.trace(PROMPT, remote=mode):
        data = open("/etc/hostname").read()  # <- ERR
        h = model.transformer.h[0].output.save()


def f_network(model, mode):
    with model.trace(PROMPT, remote=mode):
        conn = socket.create_connection  # <- ERR
        h = model.transformer.h[0].output.save()


def f_subprocess(model, mode):
    with model.trace(PROMPT, remote=mode):
        runner = subprocess.run  # <- ERR
        h = model.transformer.h[0].output.save()


def f_forbidden_builtin(model, mode):
    with model.trace(PROMPT, remote=mode):
        k = eval("2")  # <- ERR
        h = model.transformer.h[0].output.save()


def f_forbidden_attribute(model, mode):
    with model.trace(PROMPT, remote=mode):
        leak = plain_helper.__globals__  # <- ERR
        h = model.transformer.h[0].output.save()


def f_class_base(model, mode):
    class MyPath(pathlib.PurePosixPath):  # <- ERR
        pass

    p = MyPath("x")
    with model.trace(PROMPT, remote=mode):
        name = p.name
        h = model.transformer.h[0].output.save()


def f_unserializable_input(model, mode):
    with model.trace({"input_ids": torch.tensor([[1, 2]]), "extra": threading.Lock()}, remote=mode):  # <- ERR
        h = model.transformer.h[0].output.save()


def f_unserializable_result(model, mode):
    with model.trace(PROMPT, remote=mode):
        thing = object().save()  # kept on the server: cannot travel back
        h = model.transformer.h[0].output.save()


def f_out_of_order(model, mode):
    with model.trace(PROMPT, remote=mode):
        b = model.transformer.h[1].output.save()
        a = model.transformer.h[0].output.save()  # <- ERR


def f_user_exception(model, mode):
    with model.trace(PROMPT, remote=mode):
        h = model.transformer.h[0].output
        bad = h[999]  # <- ERR


def f_payload_too_large(model, mode):
    big = torch.randn(400_000)  # 1.6 MB of noise does not compress
    with model.trace(PROMPT, remote=mode):  # <- ERR
        model.transformer.h[0].output[:] += big[:128]
        h = model.transformer.h[0].output.save()


FAILING = [
    (f_unserializable, "unserializable-variable"),
    (f_module_not_allowed, "module-not-allowed"),
    (f_lambda_capture, "lambda-capture"),
    (f_undecorated_function, "undecorated-function"),
    (f_undecorated_class, "undecorated-class"),
    (f_source_unavailable, "source-unavailable"),
    (f_file_io, "file-io"),
    (f_network, "network"),
    (f_subprocess, "subprocess"),
    (f_forbidden_builtin, "forbidden-builtin"),
    (f_forbidden_attribute, "forbidden-attribute"),
    (f_class_base, "class-base-not-allowed"),
    (f_unserializable_input, "unserializable-input"),
    (f_unserializable_result, "unserializable-result"),
    (f_out_of_order, "OutOfOrderError"),
    (f_user_exception, "IndexError"),
    (f_payload_too_large, "payload-too-large"),
]
