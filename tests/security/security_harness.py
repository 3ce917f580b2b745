"""The red team's machinery: an attempt as data, the evidence it could leave, and running it.

An `Attempt` is a trace body (and optionally module-level code shipped with it, `prelude`)
written with placeholders (`@CANARY@`, `@ENV@`, ...) that `Evidence.render` fills with this
run's paths and names. `run_source` runs the rendered file's `with model.trace(...)` block in
one mode and returns an `Outcome`: refused (the client, the validator or the job said no) or
ran, with every text that came back to the attacker (saved values, error text, printed
lines). `Evidence.found` then looks, from the outside, for what the attempt would have left
had it escaped: secrets in that text, files created, processes run, sockets connected. The
code under test never reports on itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import linecache
import re
import secrets
import socket
import sys
import textwrap
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "LIMITS",
    "PROMPT",
    "SECRET_ENV",
    "Attempt",
    "Evidence",
    "Outcome",
    "attacker_client",
    "limit_args",
    "render_file",
    "run_source",
    "text_of",
]

PROMPT = "The Eiffel Tower is in the city of"
#: The environment variable holding a secret set only in the server's (and, in local mode, the
#: test process's) environment.
SECRET_ENV = "INTERLACE_SECURITY_SECRET"

# Strings only an interpreter-internal object produces when printed: reaching one of these
# modules or functions is an escape even when the attempt could do nothing more with it.
_REACHED = re.compile(
    r"<module '(os|posix|sys|builtins|subprocess|importlib[\w.]*|io|_io|socket|ctypes|shutil|pickle|"
    r"_pickle|marshal|gc|inspect|pty|signal|threading|multiprocessing[\w.]*|urllib[\w.]*|http[\w.]*)'"
    r"|<built-in function (open|eval|exec|compile|__import__|getpid|system|fork|breakpoint|globals|"
    r"vars|locals)>|<class 'os\._wrap_close'>|<class 'subprocess\.Popen'>|WorkerInfo\(id="
)


#: The limits the suite means to run under (an attempt that ends having gone beyond one of
#: them escaped, whether or not the server offers the flag to set it).
LIMITS = {"timeout_seconds": 3.0, "cpu_seconds": 3.0, "max_memory_bytes": 1 << 30,
          "max_log_bytes": 64 * 1024, "max_result_bytes": 16 << 20, "max_upload_bytes": 8 << 20}


def limit_args(help_text: str) -> tuple[list[str], list[str]]:
    """`interlace serve` flags for `LIMITS` among those its help lists, and the limits left unset."""
    flags = set(re.findall(r"(--[a-z][a-z0-9-]+)", help_text))
    wanted = [
        ("timeout_seconds", ["--job-timeout", "--timeout", "--job-timeout-s", "--job-wall-seconds"], "3"),
        ("cpu_seconds", ["--job-cpu-seconds", "--cpu-seconds", "--job-cpu", "--job-cpu-s"], "3"),
        ("max_memory_bytes", ["--job-memory-mb", "--max-memory-mb", "--memory-mb"], "1024"),
        ("max_log_bytes", ["--max-log-kb", "--job-log-kb", "--log-kb"], "64"),
        ("max_result_bytes", ["--max-result-mb", "--result-mb"], "16"),
        ("max_upload_bytes", ["--max-upload-mb"], "8"),
    ]
    args, missing = [], []
    for limit, names, value in wanted:
        name = next((n for n in names if n in flags), None)
        if name is None:
            missing.append(limit)
        else:
            args += [name, value]
    return args, missing


@dataclass(frozen=True)
class Attempt:
    """One escape or abuse attempt.

    `body` is the trace body (unindented); `prelude` module-level code before the `with`
    (functions and classes the body uses are shipped as source). `hazard` marks attempts
    that, if they escape, would hang, crash or bloat the process running them: under
    `remote='local'` they run in a child process (see `local_child.py`), never in pytest's.
    `wait` bounds how long the test waits for the job (seconds). `needs_process` marks
    attempts that only a worker process can stop (one C call that runs long, or one huge
    allocation: no Python-level guard runs inside them): under `remote='local'` they run with
    `isolate=True`, the simulation's way to get the server's layer 3.
    """

    name: str
    kind: str
    body: str
    prelude: str = ""
    hazard: bool = False
    wait: float = 60.0
    needs_process: bool = False
    note: str = ""


@dataclass
class Outcome:
    refused: bool
    text: str = ""  # every text the attacker got back: values, error, printed lines
    values: dict[str, Any] = field(default_factory=dict)
    hung: bool = False  # the job did not end within the attempt's wait
    crashed: bool = False  # the process that ran it died
    seconds: float = 0.0
    log_bytes: int = 0
    client_error: bool = False  # it never reached the server: the attempt itself needs fixing


def text_of(value: Any, depth: int = 0) -> str:
    """Everything a saved value says, tensors decoded as bytes too (a canary read into a uint8
    tensor is a canary read)."""
    if depth > 6:
        return ""
    if isinstance(value, torch.Tensor):
        out = [repr(value.dtype)]
        if value.dtype == torch.uint8 and value.numel() <= 1 << 20:
            out.append(bytes(value.flatten().tolist()).decode("latin-1"))
        return " ".join(out)
    if isinstance(value, dict):
        return " ".join(f"{text_of(k, depth + 1)}={text_of(v, depth + 1)}" for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return " ".join(text_of(v, depth + 1) for v in value)
    if isinstance(value, bytes):
        return value.decode("latin-1")
    try:
        import numpy as np

        if isinstance(value, np.ndarray):
            return value.tobytes().decode("latin-1") if value.dtype == np.uint8 else repr(value)
    except ImportError:  # pragma: no cover
        pass
    try:
        return repr(value)
    except Exception as exc:  # noqa: BLE001 - a value whose repr fails still says something
        return f"<unreprable {type(exc).__name__}>"


class Evidence:
    """The traps one attempt run can fall into, fresh per run, and the check of them.

    - a canary file with random content (`@CANARY@`), a torch-pickled canary (`@PCANARY@`),
      a canary in the server's data dir (`@DATACANARY@`);
    - a path the attempt tries to write (`@WRITE@`, `@WRITEDIR@` an empty directory);
    - a marker a subprocess or unpickled gadget would create (`@MARKER@`), with an evil pickle
      (`@EVILPKL@`), an evil `.npy` (`@EVILNPY@`) and a torch.hub dir (`@HUBDIR@`) that create it;
    - a loopback listening socket (`@PORT@`);
    - the environment secret (`@ENV@` names the variable), the server's or this process's PID
      (`@PID@`), its data dir (`@DATA@`), and `@DONE@`, a token an attempt saves only after
      finishing work beyond a limit (so finishing is the evidence).
    """

    def __init__(self, root: Path, *, secret: str, pid: int, data_dir: Path, listener: socket.socket,
                 other_key: str = "") -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.secret = secret
        self.pid = pid
        self.data_dir = data_dir
        self.listener = listener
        self.other_key = other_key
        self.canary_text = "CANARY-" + secrets.token_hex(12)
        self.done = "DONE-" + secrets.token_hex(8)
        self.canary = root / "canary.txt"
        self.canary.write_text(self.canary_text + "\n")
        self.pcanary = root / "canary.pt"
        torch.save({"secret": self.canary_text}, self.pcanary)
        self.data_canary_text = "OTHERUSER-" + secrets.token_hex(12)
        (data_dir / "other-user-result.txt").write_text(self.data_canary_text)
        self.jdir = root / "jdir"
        self.jdir.mkdir(exist_ok=True)
        self.jcanary = self.jdir / "config.json"
        self.jcanary.write_text(json.dumps({"model_type": "gpt2", "secret": self.canary_text}))
        self.write = root / "written.txt"
        self.writedir = root / "writedir"
        self.writedir.mkdir(exist_ok=True)
        self.marker = root / "marker"
        self.evilpkl = root / "evil.pkl"
        self.evilpkl.write_bytes(_evil_pickle(self.marker))
        self.evilnpy = root / "evil.npy"
        self.evilnpy.write_bytes(_evil_npy(self.evilpkl.read_bytes()))
        self.hubdir = root / "hub"
        self.hubdir.mkdir(exist_ok=True)
        (self.hubdir / "hubconf.py").write_text(
            f"open({str(self.marker)!r}, 'w').write('hub')\n\ndef entry():\n    return 1\n")
        self.port = listener.getsockname()[1]

    def render(self, source: str) -> str:
        table = {
            "@CANARY@": str(self.canary), "@PCANARY@": str(self.pcanary), "@WRITE@": str(self.write),
            "@WRITEDIR@": str(self.writedir), "@MARKER@": str(self.marker), "@EVILPKL@": str(self.evilpkl),
            "@EVILNPY@": str(self.evilnpy), "@HUBDIR@": str(self.hubdir), "@PORT@": str(self.port),
            "@ENV@": SECRET_ENV, "@PID@": str(self.pid), "@DATA@": str(self.data_dir),
            "@DATACANARY@": str(self.data_dir / "other-user-result.txt"), "@DONE@": self.done,
            "@ROOT@": str(self.root), "@JCANARY@": str(self.jcanary), "@JDIR@": str(self.jdir),
        }
        for key, value in table.items():
            source = source.replace(key, value)
        return source

    def connections(self) -> int:
        """Connections the listener received (accepted and closed here)."""
        count = 0
        self.listener.setblocking(False)
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, OSError):
                return count
            conn.close()
            count += 1

    def found(self, outcome: Outcome) -> list[str]:
        """What the attempt achieved, as seen from outside; empty when it was contained."""
        text = outcome.text
        found = []
        if self.secret in text:
            found.append("the environment secret came back")
        if self.canary_text in text:
            found.append("the canary file was read")
        if self.data_canary_text in text:
            found.append("another user's file in the data dir was read")
        if "SQLite format 3" in text:
            found.append("the server's database was read")
        if self.other_key and self.other_key in text:
            found.append("another user's API key came back")
        reached = _REACHED.search(text)
        if reached:
            found.append(f"an interpreter object was reached: {reached.group(0)!r}")
        if self.done in text:
            found.append("it finished work beyond the limit (its DONE token came back)")
        if self.write.exists():
            found.append(f"it wrote {self.write}")
        if any(self.writedir.iterdir()):
            found.append(f"it wrote into {self.writedir}: {sorted(p.name for p in self.writedir.iterdir())[:5]}")
        if self.marker.exists():
            found.append("a subprocess or unpickled gadget ran (marker file created)")
        if self.connections():
            found.append("it connected to the test's loopback socket")
        if "Internal Server Error" in text or "HTTP 500" in text:
            found.append("the server answered 500 (an unhandled error)")
        if outcome.hung:
            found.append("the job hung past its wait")
        if outcome.crashed:
            found.append("the process running it died")
        return found


def _evil_pickle(marker: Path) -> bytes:
    # Protocol-0 pickle of os.system("touch marker"): what unpickling untrusted bytes runs.
    command = f"touch {marker}"
    return f"cos\nsystem\n(V{command}\ntR.".encode()


def _evil_npy(pickle_bytes: bytes) -> bytes:
    """A .npy file holding an object array whose pickle is `pickle_bytes`."""
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header = header + " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + pickle_bytes


def render_file(attempt: Attempt, evidence: Evidence, path: Path, trace_call: str) -> str:
    """The attempt as a Python file: imports, its prelude, then the trace with its body."""
    body = textwrap.indent(evidence.render(textwrap.dedent(attempt.body).strip("\n")), "    ")
    prelude = evidence.render(textwrap.dedent(attempt.prelude).strip("\n"))
    source = (f"import interlace\nimport torch\n\n{prelude}\n\n"
              f"with {trace_call} as tracer:\n{body}\n")
    path.write_text(source)
    linecache.checkcache(str(path))
    return source


@contextlib.contextmanager
def attacker_client():
    """The client as an attacker runs it: it sends whatever it encodes, without checking it
    against the policy first (the server's own checks are what is under test). Patches the
    one check both remote backends call, `encode_for_remote`, for the duration."""
    from interlace.backends import outbound, remote, simulation

    def encode_unchecked(trace: Any, model_key: str, policy: Any, *, strict_remote: bool) -> Any:
        built = outbound.build_request(trace, model_key, policy, strict_remote=strict_remote)
        return outbound.encode_request(built), built

    saved = (remote.encode_for_remote, simulation.encode_for_remote)
    remote.encode_for_remote = simulation.encode_for_remote = encode_unchecked
    try:
        yield
    finally:
        remote.encode_for_remote, simulation.encode_for_remote = saved


def run_source(path: Path, namespace: dict[str, Any], *, server_job_wait: float | None = None,
               events: Any = None) -> Outcome:
    """Exec the attempt file. Server mode (`server_job_wait` set) submits without blocking and
    waits for the job at most that long; `events(job_id)` returns its printed lines."""
    from interlace import RemoteException
    from interlace.errors import InterlaceError

    start = time.monotonic()
    printed = io.StringIO()
    # A real module (in sys.modules, with __file__), so the client can read the source of the
    # prelude's classes and functions and ship them, as it does for a user's script.
    module = types.ModuleType(f"attempt_{path.stem}")
    module.__file__ = str(path)
    before = namespace.pop("__before__", set())
    namespace.pop("__name__", None)
    module.__dict__.update(namespace)
    namespace = module.__dict__
    sys.modules[module.__name__] = module
    outcome: Outcome
    try:
        code = compile(path.read_text(), str(path), "exec")
        with contextlib.redirect_stdout(printed), attacker_client():
            exec(code, namespace)  # noqa: S102 - running the attempt is the point
            if server_job_wait is None:
                values = {k: v for k, v in namespace.items() if k not in before and not k.startswith("__")
                          and k not in ("tracer", "interlace", "torch") and not isinstance(v, types.ModuleType)
                          and not isinstance(v, type) and not callable(v)}
            else:
                job = namespace["tracer"].job
                namespace["__job_id__"] = job.id
                try:
                    values = job.result(timeout=server_job_wait)
                except TimeoutError:
                    return Outcome(refused=False, hung=True, seconds=time.monotonic() - start,
                                   text=printed.getvalue())
        outcome = Outcome(refused=False, values=values, text=text_of(values))
    except (RemoteException, InterlaceError) as exc:
        outcome = Outcome(refused=True, text=f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - the attacker's own client failed: the attempt is broken
        if type(exc).__name__ in ("TimeoutError", "ReadTimeout") and server_job_wait is not None:
            return Outcome(refused=False, hung=True, seconds=time.monotonic() - start, text=str(exc))
        outcome = Outcome(refused=True, client_error=True, text=f"{type(exc).__name__}: {exc}")
    finally:
        sys.modules.pop(module.__name__, None)
    outcome.seconds = time.monotonic() - start
    logs = printed.getvalue()
    if events is not None and namespace.get("__job_id__"):
        logs += events(namespace["__job_id__"])
    outcome.log_bytes = len(logs.encode())
    outcome.text += "\n" + logs[-200_000:]
    return outcome
