"""Every attempt in the tables, against a real server and under `remote='local'`.

One test per (attempt, mode). It runs the attempt, then looks for evidence from outside
(`Evidence.found`), then runs a normal job as another user and checks its values against the
raw-PyTorch truth bit for bit, and that the server (or this process's model) is intact. An
attempt passes when it was refused or contained, and ended the same way (refused or
contained) in both modes. See README.md.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from security_attempts import ATTEMPTS
from security_harness import (
    LIMITS,
    PROMPT,
    Attempt,
    Evidence,
    Outcome,
    render_file,
    run_source,
)

import interlace
from interlace._version import __version__

#: Each attempt's outcome per mode ("refused" / "contained"), to compare the two modes.
OUTCOMES: dict[str, dict[str, str]] = {}

PROBE = """
h0 = model.transformer.h[0].output.save()
lg = model.lm_head.output.save()
z = torch.zeros(2).save()
r = torch.rand(4).save()
import random
rr = interlace.save(random.random())
cfg = interlace.save([model.config.output_hidden_states, model.config.output_attentions, model.config.n_layer])
ln = torch.nn.LayerNorm(4)(torch.ones(1, 4)).save()
lin = torch.nn.Linear(2, 2, bias=False)(torch.zeros(1, 2)).save()
import collections.abc
abcm = interlace.save(isinstance(torch.zeros(1), collections.abc.Mapping))
"""
ATTACK_SEED = 1234  # the seed the seeding attempts leave behind


def _seeded() -> tuple[torch.Tensor, float]:
    gen = torch.Generator().manual_seed(ATTACK_SEED)
    return torch.rand(4, generator=gen), random.Random(ATTACK_SEED).random()


def check_probe(values: dict[str, Any], truth: dict[str, Any]) -> list[str]:
    """What is wrong with a normal job's values (empty when all is as it should be)."""
    wrong = []
    if not torch.equal(values.get("h0", torch.empty(0)), truth["h0"]):
        wrong.append("layer 0's output differs from the raw-PyTorch truth")
    if not torch.equal(values.get("lg", torch.empty(0)), truth["logits"]):
        wrong.append("the logits differ from the raw-PyTorch truth")
    z = values.get("z")
    if not isinstance(z, torch.Tensor) or z.dtype != torch.float32 or z.device.type != "cpu":
        wrong.append(f"torch.zeros(2) is {z!r} (the default dtype or device was left changed)")
    seeded_rand, seeded_random = _seeded()
    if isinstance(values.get("r"), torch.Tensor) and torch.equal(values["r"], seeded_rand):
        wrong.append("torch's random generator was left seeded by the attacker")
    if values.get("rr") == seeded_random:
        wrong.append("Python's random generator was left seeded by the attacker")
    for name, shape in (("ln", (1, 4)), ("lin", (1, 2))):
        got = values.get(name)
        if not isinstance(got, torch.Tensor) or not torch.equal(got, torch.zeros(shape)):
            wrong.append(f"a freshly built torch.nn module computes {got!r} (a torch class was left changed)")
    if values.get("abcm") is not False:
        wrong.append("torch.Tensor was left registered as a collections.abc.Mapping")
    if values.get("cfg") != truth["cfg"]:
        wrong.append(f"the model's config reads {values.get('cfg')!r}, not {truth['cfg']!r}")
    return wrong


# --- process-state snapshot for local mode ---------------------------------------------------
# Under remote='local' an escaped attempt changes this process; restore what the attempts
# touch so one escape does not fail every later test (the escape itself is still reported).

def _watched_classes() -> list[type]:
    """Classes whose attributes every job relies on: a change to one outlives the job."""
    from transformers.models.gpt2 import modeling_gpt2

    from interlace.tracing.envoy import Envoy

    classes = [torch.nn.Module, torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Embedding, torch.nn.Dropout,
               torch.nn.ModuleList, torch.Tensor, torch.nn.Parameter, Envoy]
    classes += [v for v in vars(modeling_gpt2).values() if isinstance(v, type) and v.__module__ == modeling_gpt2.__name__]
    # What the body's `model` and `model.tokenizer` are: a class-level change there (a
    # `__reduce_ex__` gadget setting `output` on the model's class) breaks every later trace.
    import interlace
    from transformers import PreTrainedTokenizerFast

    classes += [c for c in (*interlace.LanguageModel.__mro__, *PreTrainedTokenizerFast.__mro__)
                if c is not object and c not in classes]
    return classes


def class_state() -> dict[str, Any]:
    return {f"{c.__module__}.{c.__qualname__}": dict(vars(c)) for c in _watched_classes()}


def _snapshot() -> dict[str, Any]:
    from torch.nn.modules import module as module_mod

    return {
        # every loaded module's namespace (enum.global_enum and friends write into any of them)
        "modules": {name: (m, dict(vars(m))) for name, m in list(sys.modules.items()) if m is not None},
        "dtype": torch.get_default_dtype(), "grad": torch.is_grad_enabled(),
        "hooks": [dict(getattr(module_mod, n)) for n in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                        "_global_backward_hooks")],
        "classes": class_state(), "classes_objs": _watched_classes(), "abcs": _abc_registries(),
    }


def _abcs() -> list[type]:
    import collections.abc as cabc
    import numbers

    return [v for v in (*vars(cabc).values(), *vars(numbers).values()) if isinstance(v, type) and hasattr(v, "_abc_impl")]


def _abc_registries() -> dict[type, list[type]]:
    """What each standard ABC has registered (`register` has no undo; see `_restore`)."""
    import abc

    return {cls: [r() for r in abc._get_dump(cls)[0] if r() is not None] for cls in _abcs()}


def _restore_abcs(saved: dict[type, list[type]]) -> None:
    for cls, registered in saved.items():
        import abc

        current = [r() for r in abc._get_dump(cls)[0] if r() is not None]
        if set(map(id, current)) != set(map(id, registered)):
            cls._abc_registry_clear()
            for sub in registered:
                cls.register(sub)
    for cls in saved:
        cls._abc_caches_clear()


def _restore(snap: dict[str, Any]) -> None:
    from torch.nn.modules import module as module_mod

    for name, (module, saved) in snap["modules"].items():
        space = vars(module)
        for key, value in saved.items():
            if space.get(key, _GONE) is not value:
                space[key] = value
        # (names a module gained are left: torch adds submodules as they are imported)
    for cls in snap["classes_objs"]:
        saved = snap["classes"][f"{cls.__module__}.{cls.__qualname__}"]
        for key in set(vars(cls)) - set(saved):
            try:
                delattr(cls, key)
            except (AttributeError, TypeError):
                pass
        for key, value in saved.items():
            if vars(cls).get(key) is not value:
                try:
                    setattr(cls, key, value)
                except (AttributeError, TypeError):
                    pass
    _restore_abcs(snap["abcs"])
    torch.set_default_dtype(snap["dtype"])
    torch.set_default_device(None)
    torch.set_grad_enabled(snap["grad"])
    for name, saved in zip(("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"),
                           snap["hooks"]):
        hooks = getattr(module_mod, name)
        hooks.clear()
        hooks.update(saved)


_GONE = object()


def model_integrity(model: Any, truth: dict[str, Any], baseline: dict[str, Any]) -> list[str]:
    """What a local attempt left changed on the model object itself."""
    module = model._module
    wrong = []
    state = module.state_dict()
    if set(state) != set(truth["state"]) or any(not torch.equal(state[k], v) for k, v in truth["state"].items()):
        wrong.append("the model's weights or buffers changed")
    if [n for n, _ in module.named_modules()] != baseline["tree"]:
        wrong.append("the module tree changed")
    if any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in module.modules()):
        wrong.append("a hook was left on a module")
    if any(m.training for m in module.modules()):
        wrong.append("a module was left in training mode")
    if [p.requires_grad for p in module.parameters()] != baseline["requires_grad"]:
        wrong.append("requires_grad was left changed")
    if module.config.to_dict() != baseline["config"]:
        wrong.append("the model's config changed")
    attrs = {n: {k: v for k, v in vars(m).items() if not k.startswith("_") and not isinstance(v, torch.Tensor)}
             for n, m in module.named_modules()}
    if repr(attrs) != baseline["attrs"]:
        wrong.append("a module attribute changed")
    return wrong


def _baseline(model: Any) -> dict[str, Any]:
    module = model._module
    return {"tree": [n for n, _ in module.named_modules()],
            "requires_grad": [p.requires_grad for p in module.parameters()],
            "config": module.config.to_dict(),
            "attrs": repr({n: {k: v for k, v in vars(m).items() if not k.startswith("_")
                               and not isinstance(v, torch.Tensor)} for n, m in module.named_modules()})}


class LocalRunner:
    """remote='local' in this process, and a child process for hazardous attempts."""

    def __init__(self, model_path: Path) -> None:
        from interlace.contract.policy import Policy

        self.model_path = model_path
        self.policy = Policy(**LIMITS)
        self.child: subprocess.Popen | None = None
        self.model = None
        self.baseline = None
        self.fresh_model()

    def fresh_model(self) -> None:
        self.model = interlace.LanguageModel(str(self.model_path))
        self.model._module  # noqa: B018 - load the weights now
        self.model.dispatch() if hasattr(self.model, "dispatch") else None
        self.baseline = None

    def namespace(self) -> dict[str, Any]:
        from interlace.backends.simulation import LocalSimulationBackend

        ns = {"model": self.model, "PROMPT": PROMPT, "BACKEND": LocalSimulationBackend(self.model, policy=self.policy),
              "__name__": "attempt"}
        ns["__before__"] = set(ns) | {"__before__", "__builtins__"}
        return ns

    def run(self, path: Path) -> Outcome:
        return run_source(path, self.namespace())

    def _start_child(self) -> None:
        here = Path(__file__).parent
        self.child = subprocess.Popen(
            [sys.executable, str(here / "local_child.py"), str(self.model_path), json.dumps(self.policy.to_json())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=str(here))
        line = self._read_line(180)
        if line is None or not json.loads(line).get("ready"):
            raise RuntimeError("the local child did not start")

    def _read_line(self, wait: float) -> str | None:
        import select

        assert self.child is not None and self.child.stdout is not None
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.child.stdout], [], [], 0.2)
            if ready:
                line = self.child.stdout.readline()
                return line or None
            if self.child.poll() is not None:
                return None
        return ""

    def run_hazard(self, path: Path, wait: float, isolate: bool = False) -> Outcome:
        if self.child is None or self.child.poll() is not None:
            self._start_child()
        assert self.child is not None and self.child.stdin is not None
        start = time.monotonic()
        self.child.stdin.write(json.dumps({"path": str(path), "isolate": isolate}) + "\n")
        self.child.stdin.flush()
        line = self._read_line(wait)
        if line:
            data = json.loads(line)
            return Outcome(refused=data["refused"], text=data["text"], seconds=data["seconds"],
                           log_bytes=data["log_bytes"], client_error=data.get("client_error", False))
        hung = line == ""
        self.close_child()
        return Outcome(refused=False, hung=hung, crashed=not hung, seconds=time.monotonic() - start)

    def close_child(self) -> None:
        if self.child is not None:
            if self.child.poll() is None:
                self.child.kill()
            self.child.wait(10)
            self.child = None


@pytest.fixture(scope="module")
def local_runner(tiny_gpt2_path):
    runner = LocalRunner(tiny_gpt2_path)
    yield runner
    runner.close_child()


def _events_text(server: Any) -> Any:
    def events(job_id: str) -> str:
        headers = {"X-Interlace-Key": server.attacker_key, "X-Interlace-Version": __version__}
        try:
            answer = httpx.get(f"{server.url}/v1/jobs/{job_id}/events", headers=headers, timeout=30)
            lines = [e.get("description") or "" for e in answer.json().get("events", [])]
            return "\n".join(str(x) for x in lines)
        except Exception as exc:  # noqa: BLE001 - the text is evidence, not the test
            return f"<events unavailable: {exc}>"
    return events


def _with_key(monkeypatch: pytest.MonkeyPatch, server: Any, key: str) -> None:
    monkeypatch.setattr(interlace.CONFIG.API, "HOST", server.url)
    monkeypatch.setattr(interlace.CONFIG.API, "APIKEY", key)
    monkeypatch.setattr(interlace.CONFIG.APP, "REMOTE_LOGGING", False)


_CLIENT_MODELS: dict[str, Any] = {}


def _client_model(path: Path) -> Any:
    """The attacker's and the other user's client-side model in server mode (never the one the
    server runs, so one copy serves every test)."""
    key = str(path)
    if key not in _CLIENT_MODELS:
        _CLIENT_MODELS[key] = interlace.LanguageModel(key)
    return _CLIENT_MODELS[key]


def server_probe(server: Any, path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any] | None, str]:
    _with_key(monkeypatch, server, server.other_key)
    path.write_text("import interlace\nimport torch\n\nwith model.trace(PROMPT, remote=True, blocking=False) as tracer:\n"
                    + "".join(f"    {line}\n" for line in PROBE.strip().splitlines()))
    outcome = run_source(path, {"model": _client_model(server.model_path), "PROMPT": PROMPT, "__name__": "probe"},
                         server_job_wait=60)
    if outcome.refused or outcome.hung:
        return None, outcome.text[:2000]
    return outcome.values, ""


def local_probe(runner: LocalRunner, path: Path) -> tuple[dict[str, Any] | None, str]:
    path.write_text("import interlace\nimport torch\n\nwith model.trace(PROMPT, backend=BACKEND) as tracer:\n"
                    + "".join(f"    {line}\n" for line in PROBE.strip().splitlines()))
    outcome = runner.run(path)
    if outcome.refused:
        return None, outcome.text[:2000]
    return outcome.values, ""


PARAMS = [pytest.param(a, m, id=f"{a.name}-{m}") for a in ATTEMPTS for m in ("server", "local")]


@pytest.mark.parametrize(("attempt", "mode"), PARAMS)
def test_attempt(attempt: Attempt, mode: str, request, tmp_path, truth, listener, monkeypatch, tiny_gpt2_path):
    server = request.getfixturevalue("security_server")
    server.model_path = tiny_gpt2_path
    if not server.alive():
        server.restart()
    evidence = Evidence(tmp_path / "traps", secret=server.secret,
                        pid=server.pid if mode == "server" else os.getpid(), data_dir=server.data_dir,
                        listener=listener, other_key=server.other_key)
    evidence.connections()  # start from zero
    problems: list[str] = []
    if mode == "server":
        _with_key(monkeypatch, server, server.attacker_key)
        render_file(attempt, evidence, tmp_path / f"{attempt.name}.py",
                    "model.trace(PROMPT, remote=True, blocking=False)")
        model = _client_model(tiny_gpt2_path)
        outcome = run_source(tmp_path / f"{attempt.name}.py", {"model": model, "PROMPT": PROMPT, "__name__": "attempt"},
                             server_job_wait=attempt.wait, events=_events_text(server))
        if outcome.hung or not server.alive():
            outcome.crashed = not server.alive()
            server.restart()
        found = evidence.found(outcome)
        values, why = server_probe(server, tmp_path / "probe.py", monkeypatch)
        if values is None:
            problems.append(f"the next user's normal job failed: {why}")
            server.restart()
        else:
            wrong = check_probe(values, truth)
            problems += [f"the next user's result: {w}" for w in wrong]
            if wrong:
                server.restart()  # a fresh server for the next attempt
    else:
        runner = request.getfixturevalue("local_runner")
        monkeypatch.setattr(interlace.CONFIG.API, "APIKEY", "APIKEY-" + server.secret)
        monkeypatch.setattr(interlace.CONFIG.APP, "REMOTE_LOGGING", False)
        render_file(attempt, evidence, tmp_path / f"{attempt.name}.py", "model.trace(PROMPT, backend=BACKEND)")
        if runner.baseline is None:
            runner.baseline = _baseline(runner.model)
        snap = _snapshot()
        try:
            if attempt.hazard:
                outcome = runner.run_hazard(tmp_path / f"{attempt.name}.py", attempt.wait, isolate=attempt.needs_process)
            else:
                outcome = runner.run(tmp_path / f"{attempt.name}.py")
            found = evidence.found(outcome)
            try:
                values, why = local_probe(runner, tmp_path / "probe.py")
                if values is None:
                    problems.append(f"the next normal simulated trace failed: {why}")
                else:
                    problems += [f"the next simulated trace: {w}" for w in check_probe(values, truth)]
                integrity = model_integrity(runner.model, truth, runner.baseline)
                problems += [f"the model object: {w}" for w in integrity]
                now = class_state()
                changed = sorted(k for k, v in snap["classes"].items()
                                 if set(now[k]) != set(v) or any(now[k][n] is not v[n] for n in v))
                if changed:
                    problems.append(f"classes every later job uses were changed: {changed[:5]}")
            except Exception as exc:  # noqa: BLE001 - this process was left broken: that is the evidence
                problems.append(f"checking this process after the attempt failed ({type(exc).__name__}: {exc})")
        finally:
            _restore(snap)
        if problems:
            runner.fresh_model()
    if outcome.log_bytes > 2 * LIMITS["max_log_bytes"] + 20_000:
        found.append(f"{outcome.log_bytes} bytes of printed output came back (limit {LIMITS['max_log_bytes']})")
    if outcome.client_error:
        found.append("it ended in an unhandled exception, not a refusal (the client could not send it, or in "
                     f"local mode the simulation's server half crashed): {outcome.text[:300]}")
    if found or problems:
        verdict = "escaped"
    else:
        verdict = "refused" if outcome.refused else "contained"
    OUTCOMES.setdefault(attempt.name, {})[mode] = verdict
    report = {"attempt": attempt.name, "kind": attempt.kind, "mode": mode, "verdict": verdict,
              "evidence": found + problems, "refused": outcome.refused, "seconds": round(outcome.seconds, 2),
              "said": outcome.text[:600]}
    _record(report)
    assert not (found or problems), (
        f"ESCAPE ({mode}): {attempt.name} [{attempt.kind}]\nevidence: {found + problems}\n"
        f"what came back: {outcome.text[:1500]}")
    other = OUTCOMES[attempt.name].get("server" if mode == "local" else "local")
    if other in ("refused", "contained"):
        assert other == verdict, f"{attempt.name}: {verdict} in {mode} mode but {other} in the other mode"


def _record(report: dict[str, Any]) -> None:
    """Append one line per test to $INTERLACE_SECURITY_REPORT (a JSON-lines file), if set."""
    path = os.environ.get("INTERLACE_SECURITY_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps(report) + "\n")
