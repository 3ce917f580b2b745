"""One worker process, the parent's side: start it, feed it jobs and batches, kill it.

`WorkerProcess` is one worker: started through bubblewrap when the host has it (no network,
its own PID, IPC and user namespaces, uid nobody, a clean environment, a read-only view of
only the files it needs: Python, the installed packages, the model's files; a private /tmp;
never the server's data directory), else as a plain subprocess with the same clean
environment (then `available_layers()["namespaces"]` is False and the server says so). The
parent talks to it only over a socketpair (`channel.py`; the conversation is drawn in
`worker.py`), kills it with SIGKILL when a job runs past its wall-clock, CPU or memory limit,
and names the cause when it dies. `process.WorkerSupervisor` keeps one alive per model.

A batch (`run_batch`, co-batching: `cobatch.py`) is one message each way. Its wall clock and
CPU allowance are n times one job's (n jobs may each take their whole limit; each job's own
guard in the worker still stops it at its own), its memory allowance one job's. A batch ends
with every job's outcome, or with `WorkerDied`: the supervisor then runs each job alone.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..contract.local_block import LocalPeer
from ..contract.policy import Policy
from .batch_channel import OP_BATCH_DONE, OP_BATCH_FAILED, MalformedBatch, decode_outcomes, encode_batch
from .channel import Channel, ChannelClosed
from .cobatch import BatchLimits, JobOutcome
from .confine import available_layers, bwrap_path
from .errors import JobFailed
from .local_channel import OP_LOCAL_REPLY, OP_LOCAL_START, LocalRelay, MalformedLocalMessage
from .worker_host import cpu_seconds, empty_dir, gpu_devices, inside, readable_paths, rss_bytes, worker_pid

__all__ = [
    "ENTRY_MODULE", "KEPT_ENV", "MALLOC_PERTURB", "WorkerDied", "WorkerProcess", "WorkerSpec", "WorkerStartError",
    "describe_death",
]

log = logging.getLogger("interlace.worker")

#: The worker's entry point (a module in `models/`, which may load a model by path).
ENTRY_MODULE = "interlace.models.worker"
#: The byte glibc fills freed memory with in a worker (`_env`, MALLOC_PERTURB_).
MALLOC_PERTURB = 0xA5
#: Environment variables a worker keeps (values are paths and switches, never credentials).
KEPT_ENV = ("LANG", "LC_ALL", "TZ", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "HF_HOME", "HF_HUB_CACHE",
            "TRANSFORMERS_CACHE", "TORCH_HOME", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
# How often the parent looks at a running job's CPU time and memory (seconds). The job's
# answer wakes the parent at once; only the limits wait for this tick.
_POLL_S = 0.1
_STDERR_LINES = 60
_MALFORMED = "the job's worker sent a malformed message and was stopped; the server replaced it."


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker hosts: the key it answers to, how it loads the model, what it may read."""

    key: str
    model: dict[str, Any]  # the loader spec (`models/worker.load_model`)
    read_paths: tuple[str, ...] = ()  # the model's files, exposed read-only
    hidden_paths: tuple[str, ...] = ()  # never exposed (the server's data directory)
    threads: int | None = None
    entry: str = ENTRY_MODULE  # the module run with `python -m` (tests run a probe in its place)


class WorkerStartError(RuntimeError):
    """The worker could not load its model or confine itself; the message says why."""


class WorkerDied(Exception):
    """The worker process ended while it held a job (`started`) or before it got one."""

    def __init__(self, reason: str, category: str, started: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.category = category
        self.started = started


@dataclass
class _Kill:
    reason: str
    category: str


class WorkerProcess:
    """One worker: `start()`, then `run(payload, log)` per job or `run_batch(payloads, limits)`
    per co-batch, `close()` at the end."""

    def __init__(self, spec: WorkerSpec, policy: Policy, *, sandbox: bool | None = None) -> None:
        self.spec = spec
        self.policy = policy
        self.sandboxed = bool(bwrap_path()) if sandbox is None else sandbox
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: Channel | None = None
        self.meta: Any = None
        self.layers: dict[str, bool] = {}
        self.host_pid: int | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=_STDERR_LINES)
        self._killed: _Kill | None = None
        self._send_lock = threading.Lock()
        self._drainer: threading.Thread | None = None

    # -- life ---------------------------------------------------------------------------

    def start(self, timeout: float = 600.0) -> "WorkerProcess":
        import json

        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fd = child_end.fileno()
        cmd = self._command(fd)
        try:
            self.proc = subprocess.Popen(
                cmd, pass_fds=(fd,), env=self._env(), cwd="/" if self.sandboxed else empty_dir(),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True,
            )
        finally:
            child_end.close()
        self._drainer = threading.Thread(target=self._drain_output, name=f"interlace-worker-out[{self.spec.key}]",
                                         daemon=True)
        self._drainer.start()
        # Nothing the worker sends may be larger than a result (or a model description); a
        # batch's answer may be larger (`run_batch` widens it for that answer).
        self.channel = Channel(parent_end, max_body_bytes=self._max_answer_bytes(1))
        self.channel.send({
            "op": "init", "key": self.spec.key, "model": self.spec.model, "policy": self.policy.to_json(),
            "threads": self.spec.threads, "seccomp": True,
        })
        header, body = self._wait_for_message(time.monotonic() + timeout, starting=True)
        if header.get("op") != "ready":
            text = header.get("text", f"unexpected message {header.get('op')!r}")
            self.close()
            raise WorkerStartError(f"the worker for {self.spec.key!r} could not start: {text}\n"
                                   + header.get("traceback", self.output_tail()))
        self.meta = json.loads(body) if body else None
        self.layers = {**available_layers(), **header.get("layers", {}), "namespaces": self.sandboxed}
        self.host_pid = worker_pid(self.proc.pid) if self.sandboxed else self.proc.pid
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.channel is not None

    def close(self) -> None:
        """Stop the worker (politely if idle, SIGKILL if it does not go at once)."""
        if self.channel is not None:
            try:
                with self._send_lock:
                    self.channel.send({"op": "stop"})
            except (ChannelClosed, OSError):
                pass
            self.channel.close()
            self.channel = None
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                self.kill("stopped")
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def kill(self, reason: str, category: str = "killed") -> None:
        """SIGKILL the worker (and its bubblewrap parents); `reason` is what its job reports."""
        if self._killed is None:
            self._killed = _Kill(reason, category)
        for pid in (self.host_pid, self.proc.pid if self.proc else None):
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    def output_tail(self) -> str:
        return "\n".join(self._stderr)

    # -- jobs ---------------------------------------------------------------------------

    def run(self, payload: bytes, log_line: Callable[[str], None],
            local: LocalPeer | None = None) -> tuple[bytes, bool]:
        """Run one job; returns (result bytes, recycle). Raises JobFailed (the job failed, and
        `.recycle` says whether the worker must be replaced) or WorkerDied. `local` runs the
        job's local blocks on its client (`local_channel.py`); without one they fail."""
        if not self.alive:
            raise WorkerDied(self._death_reason(), "crash", started=False)
        assert self.channel is not None
        try:
            with self._send_lock:
                self.channel.send({"op": "job"}, payload)
        except (ChannelClosed, OSError):
            raise WorkerDied(self._death_reason(), "crash", started=False) from None
        deadline = time.monotonic() + self.policy.timeout_seconds
        cpu_start = cpu_seconds(self.host_pid)
        rss_start = rss_bytes(self.host_pid)
        relay = LocalRelay(local)
        while True:
            header, body = self._wait_for_message(deadline, cpu_start=cpu_start, rss_start=rss_start)
            op = header.get("op")
            if op == "log":
                log_line(str(header.get("line", "")))
            elif op in (OP_LOCAL_START, OP_LOCAL_REPLY):
                # The worker waits (using no CPU) while the client runs the block: the wall
                # clock stops for that time. Its CPU time and memory count as always.
                waited = time.monotonic()
                self._relay(relay, header, body)
                deadline += time.monotonic() - waited
            elif op == "done":
                return body, bool(header.get("recycle"))
            elif op == "failed":
                failed = JobFailed(str(header.get("text", "the job failed")), str(header.get("category", "user")))
                failed.recycle = bool(header.get("recycle"))  # type: ignore[attr-defined]
                raise failed
            else:
                self.kill(f"the worker sent an unexpected message {op!r}", "internal")
                raise WorkerDied(f"the worker sent an unexpected message {op!r}", "internal")

    def _relay(self, relay: LocalRelay, header: dict[str, Any], body: bytes) -> None:
        assert self.channel is not None
        try:
            answer, data = relay.answer(header, body)
        except MalformedLocalMessage:
            self.kill(_MALFORMED, "internal")
            self._reap()
            raise WorkerDied(self._death_reason(), self._death_category()) from None
        try:
            with self._send_lock:
                self.channel.send(answer, data)
        except (ChannelClosed, OSError):
            self._reap()
            raise WorkerDied(self._death_reason(), self._death_category()) from None

    def run_batch(self, payloads: Sequence[bytes], limits: BatchLimits) -> tuple[list[JobOutcome], bool]:
        """Run `payloads` as one co-batch (`cobatch.run_batch` in the worker); returns (one
        outcome per job, in order; recycle). Raises WorkerDied when the batch is lost as a
        whole (`started` False: the worker never had it); the caller then retries or runs the
        jobs alone. Batched jobs have no local blocks (they never share), so nothing is relayed."""
        if not self.alive:
            raise WorkerDied(self._death_reason(), "crash", started=False)
        assert self.channel is not None
        count = len(payloads)
        header, body = encode_batch(payloads, limits)
        try:
            with self._send_lock:
                self.channel.send(header, body)
        except (ChannelClosed, OSError):
            raise WorkerDied(self._death_reason(), "crash", started=False) from None
        # n jobs may each run to their own limit (each job's guard in the worker stops it
        # there); memory is one job's, as the jobs' rows are in memory together.
        deadline = time.monotonic() + self.policy.timeout_seconds * count
        self.channel.max_body_bytes = self._max_answer_bytes(count)
        try:
            answer, data = self._wait_for_message(deadline, cpu_start=cpu_seconds(self.host_pid),
                                                  rss_start=rss_bytes(self.host_pid), jobs=count)
        finally:
            if self.channel is not None:
                self.channel.max_body_bytes = self._max_answer_bytes(1)
        op = answer.get("op")
        if op == OP_BATCH_DONE:
            try:
                return decode_outcomes(answer, data, count), bool(answer.get("recycle"))
            except MalformedBatch as exc:
                log.warning("worker[%s]: %s", self.spec.key, exc)
        elif op == OP_BATCH_FAILED:
            # The worker exits after this answer; its jobs are run again alone.
            log.warning("worker[%s]: a batch of %d jobs failed as a whole (%s): %s", self.spec.key, count,
                        answer.get("category"), str(answer.get("text", ""))[-2000:])
            self._reap()
            raise WorkerDied(str(answer.get("text", "the batch failed")), str(answer.get("category", "internal")))
        self.kill(_MALFORMED, "internal")
        self._reap()
        raise WorkerDied(self._death_reason(), self._death_category())

    def _max_answer_bytes(self, jobs: int) -> int:
        # Each job's result, and its printed lines as JSON (at most 6 bytes a byte, escaped).
        per_job = max(self.policy.max_result_bytes, 256 * 2**20) + 6 * self.policy.max_log_bytes
        return jobs * per_job + 2**20

    def _wait_for_message(self, deadline: float, *, starting: bool = False, cpu_start: float | None = None,
                          rss_start: int | None = None, jobs: int = 1) -> tuple[dict[str, Any], bytes]:
        assert self.channel is not None
        sock = self.channel.sock
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 and self._killed is not None:
                remaining = _POLL_S  # killed: wait for the EOF that follows
            elif remaining <= 0:
                if starting:
                    self.kill("start-up timeout")
                    raise WorkerStartError(f"the worker for {self.spec.key!r} did not load its model in time:\n"
                                           + self.output_tail())
                self.kill(_wall_text(self.policy.timeout_seconds * jobs), "timeout")
                continue  # the EOF that follows reports it
            readable, _, _ = select.select([sock], [], [], min(_POLL_S, remaining))
            if readable:
                # A worker that sends half a message and stops must not hold the parent past
                # the job's deadline: the read has one too.
                sock.settimeout(max(remaining, 1.0))
                try:
                    return self.channel.recv()
                except TimeoutError:
                    self.kill(_wall_text(self.policy.timeout_seconds * jobs), "timeout")
                    continue
                except (ValueError, RecursionError):  # not JSON: a broken or hostile worker
                    self.kill(_MALFORMED, "internal")
                    self._reap()
                    raise WorkerDied(self._death_reason(), self._death_category()) from None
                except ChannelClosed:
                    self._reap()
                    if starting:
                        raise WorkerStartError(f"the worker for {self.spec.key!r} exited while starting "
                                               f"(exit status {self.proc and self.proc.returncode}):\n"
                                               f"{self.output_tail()}") from None
                    raise WorkerDied(self._death_reason(), self._death_category()) from None
                finally:
                    if self.channel is not None:
                        sock.settimeout(None)
            if not starting and self._killed is None:
                self._check_limits(cpu_start, rss_start, jobs)

    def _check_limits(self, cpu_start: float | None, rss_start: int | None, jobs: int = 1) -> None:
        cpu = cpu_seconds(self.host_pid)
        if cpu is not None and cpu_start is not None and cpu - cpu_start > self.policy.cpu_seconds * jobs:
            self.kill(_cpu_text(self.policy.cpu_seconds * jobs), "cpu-limit")
            return
        rss = rss_bytes(self.host_pid)
        if rss is not None and rss_start is not None and rss - rss_start > self.policy.max_memory_bytes:
            self.kill(_memory_text(self.policy.max_memory_bytes), "memory")

    def _reap(self) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:  # alive, but its channel is closed or garbled
                self.kill("the job's worker broke its channel to the server (a malformed or oversized "
                          "message) and was stopped; the server replaced it.", "internal")
                self.proc.wait(5)
        if self._drainer is not None:
            self._drainer.join(1.0)  # its last lines (a traceback) belong in the report
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def _death_category(self) -> str:
        if self._killed is not None:
            return self._killed.category
        code = self._exit_signal()
        return {signal.SIGXCPU: "cpu-limit", signal.SIGKILL: "killed"}.get(code, "crash")  # type: ignore[call-overload]

    def _exit_signal(self) -> int | None:
        if self.proc is None or self.proc.returncode is None:
            return None
        code = self.proc.returncode
        if code < 0:
            return -code
        if self.sandboxed and code > 128:  # bubblewrap reports a signal as 128 + its number
            return code - 128
        return None

    def _death_reason(self) -> str:
        if self._killed is not None:
            return self._killed.reason
        if self.proc is None:
            return "the worker was never started"
        if self.proc.poll() is None:
            return "the worker closed its channel"
        return describe_death(self.proc.returncode, self._exit_signal(), self.policy)

    # -- how it is started ----------------------------------------------------------------

    def _command(self, fd: int) -> list[str]:
        # -P: the working directory is not put on the import path (nothing there is imported).
        python = [sys.executable, "-P", "-m", self.spec.entry, "--fd", str(fd)]
        if not self.sandboxed:
            return python
        return [bwrap_path() or "bwrap", *self._bwrap_args(), "--", *python]

    def _python_path(self) -> list[str]:
        # The parent's import path, so a worker imports the very same Interlace (an editable
        # install, a PYTHONPATH checkout); entries holding a hidden path are left out.
        std = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)}
        out = []
        for entry in sys.path:
            if not entry or not os.path.isdir(entry):
                continue
            real = os.path.realpath(entry)
            if any(real == s or real.startswith(s + os.sep) for s in std):
                continue
            out.append(entry)
        return out

    def _env(self) -> dict[str, str]:
        env = {k: os.environ[k] for k in KEPT_ENV if k in os.environ}
        env.update({
            "PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": env.get("LANG", "C.UTF-8"),
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1", "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
            # glibc fills freed memory with this byte and new memory with its complement: an
            # uninitialized tensor (`torch.Tensor(n)`, `resize_`, `numpy.empty`) would otherwise
            # show an earlier job's activations, another user's data (82% of the values came
            # back in a test of 100 freed tensors). Costs a memset per small allocation.
            "MALLOC_PERTURB_": str(MALLOC_PERTURB),
        })
        path = self._python_path()
        if path:
            env["PYTHONPATH"] = os.pathsep.join(path)
        return env

    def _bwrap_args(self) -> list[str]:
        args = ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                "--unshare-user", "--uid", "65534", "--gid", "65534", "--hostname", "interlace-worker",
                "--die-with-parent", "--new-session", "--clearenv",
                "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--chdir", "/"]
        for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            top = f"/{name}"
            if os.path.islink(top):
                args += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                args += ["--ro-bind", top, top]
        hidden = self.spec.hidden_paths
        reads = [p for p in self.spec.read_paths if os.path.exists(p)]
        bound = readable_paths(self._python_path())
        bound += [p for p in reads if not any(inside(p, h) for h in hidden)]
        for path in bound:
            args += ["--ro-bind", path, path]
        # A hidden path (the server's data directory) inside a bound directory becomes an
        # empty one; then model files inside it are bound again on top (the demo model lives
        # in the data directory). One outside every bound directory is not there at all.
        for path in hidden:
            if os.path.isdir(path) and any(inside(path, b) for b in bound):
                args += ["--tmpfs", path]
        for path in reads:
            if any(inside(path, h) for h in hidden):
                args += ["--ro-bind", path, path]
        for dev in gpu_devices():
            args += ["--dev-bind", dev, dev]
        for name, value in self._env().items():
            args += ["--setenv", name, value]
        return args

    def _drain_output(self) -> None:
        proc = self.proc
        if proc is None or proc.stdout is None:
            return
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self._stderr.append(line)
            log.info("worker[%s]: %s", self.spec.key, line)


# -- texts ----------------------------------------------------------------------------------


def _wall_text(seconds: float) -> str:
    return (f"the job ran longer than the server's wall-clock limit of {seconds:g} s (policy "
            "`timeout_seconds`) and its worker was stopped (SIGKILL). Make the job shorter (fewer "
            "tokens, smaller inputs), or ask the server's operator to raise the limit.")


def _cpu_text(seconds: float) -> str:
    return (f"the job used more than the server's CPU-time limit of {seconds:g} s (policy "
            "`cpu_seconds`) and its worker was stopped (SIGKILL). Make the job do less work, or ask "
            "the server's operator to raise the limit.")


def _memory_text(limit: int) -> str:
    return (f"the job used more than the server's memory limit of {limit / 2**20:.0f} MiB (policy "
            "`max_memory_bytes`) and its worker was stopped (SIGKILL). Save fewer or smaller values "
            "(`.save()` slices, not whole tensors), or ask the server's operator to raise the limit.")


def describe_death(returncode: int | None, sig: int | None, policy: Policy) -> str:
    """Why a worker ended, in words for the user whose job it was running."""
    if sig == signal.SIGXCPU:
        return _cpu_text(policy.cpu_seconds)
    if sig == signal.SIGKILL:
        return ("the job's worker process was killed (SIGKILL) while it ran: by the kernel when the "
                "machine ran out of memory, or by the operator. The server replaced the worker; "
                "submit the job again, using less memory if it is large.")
    if sig == signal.SIGXFSZ:
        return "the job's worker tried to write a file, which jobs may not do; the worker was replaced."
    if sig is not None:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return (f"the job's worker process crashed ({name}) while it ran; the server replaced it and "
                "other jobs are not affected. A crash in native code (a torch call with unusual "
                "arguments) is the usual cause: check the job's inputs and calls.")
    return (f"the job's worker process exited (status {returncode}) while it ran; the server replaced "
            "it. Check that the job does not end the process.")
