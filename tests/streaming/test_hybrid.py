"""Hybrid execution: `with interlace.local():` blocks inside a remote body, in every mode.

Each test runs locally (`remote=False`: the block simply runs), through the simulation
(`remote='local'`: the same exchange in-process) and against a real `interlace serve`
(`remote=True`), and checks what the block saw and what it sent back against a separately
loaded copy of the model under raw hooks. Values the block keeps go into lists of the test's
own frame: anything the user has works inside a block, and those lists never travel.
"""

from __future__ import annotations

import torch

import interlace
from interlace.backends import LocalSimulationBackend
from interlace.contract.request import decode_request
from streaming_helpers import PROMPT, assert_same, line_of


def _position_bias(width: int) -> torch.Tensor:
    """A client-side tensor that differs per feature, so a misplaced or dropped value shows."""
    generator = torch.Generator().manual_seed(18)
    return torch.randn(width, generator=generator)


def test_values_round_trip_a_local_block_exactly(gpt2, raw_gpt2, mode):
    bias = _position_bias(128)
    seen = []  # the block's view of the server's values, kept on the client
    sent = []  # what the block assigned, as the client had it
    with gpt2.trace(PROMPT, remote=mode):
        hidden = gpt2.transformer.h[0].output
        kept = hidden.clone().save()  # the body's own copy of the value sent down
        with interlace.local():
            seen.append(hidden.clone())
            edited = hidden * 0.5 + bias
            sent.append(edited.clone())
        gpt2.transformer.h[0].output[:] = edited
        back = edited.clone().save()  # the body's copy of the value sent up
        after = gpt2.transformer.h[0].output.clone().save()
        logits = gpt2.lm_head.output.save()

    def edit(module, args, output):
        return output * 0.5 + bias

    truth_logits, truth = raw_gpt2.run(PROMPT, capture=("transformer.h.0",))
    edited_logits, _ = raw_gpt2.run(PROMPT, edits={"transformer.h.0": edit})
    assert len(seen) == 1 and len(sent) == 1
    assert torch.equal(seen[0], kept), "the value sent down is the body's, bit for bit"
    assert torch.equal(back, sent[0]) and torch.equal(after, sent[0]), "the value sent up is the block's, bit for bit"
    assert_same(seen[0], truth["transformer.h.0"], mode)
    assert_same(sent[0], truth["transformer.h.0"] * 0.5 + bias, mode)
    torch.testing.assert_close(logits, edited_logits, rtol=0, atol=1e-5)
    assert not torch.allclose(logits, truth_logits, atol=1e-3), "the edit written back changed the output"


def test_plain_python_values_round_trip(gpt2, raw_gpt2, mode):
    got = []
    with gpt2.trace(PROMPT, remote=mode):
        hidden = gpt2.transformer.h[1].output
        count = int(hidden.shape[1])
        label = "layer-" + str(1)
        meta = {"count": count, "label": label, "row": hidden[0, 0, :4].clone(), "nested": {"flags": [True, None]}}
        items = [count, label, 1.5, [2, "two"]]
        with interlace.local():
            got.append({"count": count, "label": label, "meta": meta, "items": items})
            count_up = count * 3
            label_up = label.upper()
            meta_up = {"count": meta["count"] + 1, "label": meta["label"] + "!", "row": meta["row"] * 2,
                       "nested": {"flags": meta["nested"]["flags"] + [False]}}
            items_up = items + ["more", -7]
        echo = interlace.save([count_up, label_up, meta_up, items_up])

    n = raw_gpt2.n_tokens(PROMPT)
    _, truth = raw_gpt2.run(PROMPT, capture=("transformer.h.1",))
    row = truth["transformer.h.1"][0, 0, :4]
    down = got[0]
    assert type(down["count"]) is int and down["count"] == n
    assert type(down["label"]) is str and down["label"] == "layer-1"
    assert down["items"] == [n, "layer-1", 1.5, [2, "two"]] and type(down["items"][2]) is float
    assert down["meta"]["count"] == n and down["meta"]["label"] == "layer-1"
    assert down["meta"]["nested"] == {"flags": [True, None]}
    assert_same(down["meta"]["row"], row, mode)
    count_up, label_up, meta_up, items_up = echo
    assert type(count_up) is int and count_up == 3 * n
    assert label_up == "LAYER-1"
    assert meta_up["count"] == n + 1 and meta_up["label"] == "layer-1!"
    assert meta_up["nested"] == {"flags": [True, None, False]}
    assert torch.equal(meta_up["row"], down["meta"]["row"] * 2)
    assert items_up == [n, "layer-1", 1.5, [2, "two"], "more", -7]


def test_a_block_reads_modules_directly(gpt2, raw_gpt2, mode):
    direct = []
    with gpt2.trace(PROMPT, remote=mode):
        first = gpt2.transformer.h[0].output.clone().save()
        with interlace.local():
            # Read in the block, not sent down by the body: the server reads them for it.
            hs = gpt2.transformer.h[2].output
            entering = gpt2.transformer.h[3].input
            direct.append((hs.clone(), entering.clone()))
        logits = gpt2.lm_head.output.save()

    truth_logits, truth = raw_gpt2.run(PROMPT, capture=("transformer.h.0", "transformer.h.2"))
    (hs, entering), = direct
    assert_same(hs, truth["transformer.h.2"], mode)
    assert_same(entering, truth["transformer.h.2"], mode)  # GPT-2 hands each block's output to the next
    assert_same(first, truth["transformer.h.0"], mode)
    torch.testing.assert_close(logits, truth_logits, rtol=0, atol=1e-5)


def test_several_blocks_share_the_client_namespace(gpt2, raw_gpt2, mode):
    record = []
    with gpt2.trace(PROMPT, remote=mode) as tracer:
        a = gpt2.transformer.h[0].output
        with interlace.local():
            first_norm = a.norm().item()  # only blocks use it: it stays on the client
            scale = 0.25  # the body uses it: sent up
        b = gpt2.transformer.h[1].output * scale
        with tracer.local():  # the tracer's spelling of the same block
            record.append((first_norm, b.norm().item(), scale))
            ratio = b.norm().item() / first_norm
        with interlace.local():
            record.append(ratio * 2)  # assigned by the previous block, sent up, read again
        summary = interlace.save({"ratio": ratio})

    _, truth = raw_gpt2.run(PROMPT, capture=("transformer.h.0", "transformer.h.1"))
    norm_a = float(truth["transformer.h.0"].norm())
    norm_b = float((truth["transformer.h.1"] * 0.25).norm())
    (got_a, got_b, got_scale), doubled = record
    assert got_scale == 0.25
    assert abs(got_a - norm_a) <= 1e-6 * norm_a and abs(got_b - norm_b) <= 1e-6 * norm_b
    assert summary["ratio"] == got_b / got_a, "the body got exactly the float the block computed"
    assert doubled == summary["ratio"] * 2


def test_a_blocks_code_and_client_names_never_leave_the_client(gpt2):
    """What travels for a block: its `with` line and the names it exchanges; not its code,
    not the local-only function, not the client's objects it uses."""
    secret_note = "client-only-note-5f1c"
    backend = LocalSimulationBackend(gpt2)
    kept_on_client = []

    @interlace.trace
    def tag_rows(t):
        return t * torch.linspace(0.5, 1.5, t.shape[-1])

    with gpt2.trace(PROMPT, backend=backend):
        hidden = gpt2.transformer.h[1].output
        with interlace.local():  # @spec-block
            label = secret_note + "-label"
            kept_on_client.append(label)
            tagged = tag_rows(hidden)
        gpt2.transformer.h[1].output[:] = tagged
        logits = gpt2.lm_head.output.save()

    request, _ = decode_request(backend.get_last_payload())
    text = request.model_dump_json()
    for name in ("client-only-note-5f1c", "-label", "tag_rows", "linspace", "secret_note", "kept_on_client"):
        assert name not in text, name
    spec, = request.local_blocks
    assert spec.line == line_of(__file__, "# @spec-block")
    assert set(spec.reads) == {"hidden"} and set(spec.writes) == {"tagged"}
    assert kept_on_client == ["client-only-note-5f1c-label"]


def test_blocks_in_a_session_body_and_in_its_traces(gpt2, raw_gpt2, mode):
    other = "Madison Square Garden is located in the city of"
    seen = []
    with gpt2.session(remote=mode):
        with gpt2.trace(PROMPT):
            last = gpt2.transformer.h[1].output[0, -1].clone()
        with interlace.local():  # between the traces, in the session's own body
            seen.append(last.clone())
            steer = last * 0.5
        with gpt2.trace(other):
            gpt2.transformer.h[1].output[:, -1] += steer
            with interlace.local():  # inside a trace of the session
                seen.append(gpt2.transformer.h[1].output[0, -1].clone())
            logits = gpt2.lm_head.output.save()

    _, truth = raw_gpt2.run(PROMPT, capture=("transformer.h.1",))
    truth_last = truth["transformer.h.1"][0, -1]

    def steer_last(module, args, output):
        output[:, -1] += truth_last * 0.5

    steered_logits, steered = raw_gpt2.run(other, capture=("transformer.h.1",), edits={"transformer.h.1": steer_last})
    first, second = seen
    assert_same(first, truth_last, mode)
    torch.testing.assert_close(second, steered["transformer.h.1"][0, -1], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, steered_logits, rtol=0, atol=1e-5)
