"""What confines a worker process from the inside: resource limits and a seccomp filter.

The worker calls `confine(...)` once, after it loaded its model and before it reads the first
job, so the filter does not have to allow what loading needs (writing caches, spawning
helpers) and every job runs under it. The parent (`process.py`) adds what only it can:
namespaces through bubblewrap, a clean environment, the wall clock and the per-job CPU
clock, each enforced by SIGKILL.

Layers, each sufficient on its own against what it covers (`available_layers()` says which
this host has; `interlace serve` prints them at start):

- rlimits: no core dumps, no file written (`RLIMIT_FSIZE` 0), a data-segment limit of the
  memory the model took plus the policy's `max_memory_bytes`, and a CPU soft limit reset
  before each job to the time used so far plus `cpu_seconds` (the kernel's SIGXCPU kills it).
- seccomp (libseccomp's Python binding, Debian's python3-seccomp): no new program
  (execve), no new process (fork, vfork, clone without CLONE_THREAD), no socket but AF_UNIX,
  no file opened for writing or created, no file renamed, removed or linked, no signal to
  another process, no ptrace, mount, namespace, module, keyring, BPF, kexec, io_uring or
  cross-process memory call, and no rlimit raised except the CPU one the worker resets.
  The filter is written here rather than taken from a profile because no packaged profile
  fits a process that must keep threads (torch's thread pools) but lose everything else.
"""

from __future__ import annotations

import errno
import functools
import os
import resource
import shutil
import subprocess
import sys
from typing import Any

__all__ = ["DEBIAN_SECCOMP_DIRS", "available_layers", "bwrap_path", "confine", "load_seccomp", "reset_cpu_limit"]

#: Where Debian's python3-seccomp puts its module (not on a virtual environment's path).
DEBIAN_SECCOMP_DIRS = ("/usr/lib/python3/dist-packages",)

# Calls refused outright (EPERM): a sandboxed job has no business with any of them.
_DENIED = (
    "execve", "execveat", "fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "bpf", "kexec_load",
    "kexec_file_load", "init_module", "finit_module", "delete_module", "keyctl", "add_key",
    "request_key", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "open_by_handle_at", "name_to_handle_at", "swapon", "swapoff", "reboot",
    "acct", "quotactl", "syslog", "iopl", "ioperm", "lookup_dcookie", "fanotify_init",
    "pidfd_open", "pidfd_getfd", "pidfd_send_signal", "kcmp", "creat", "unlink", "unlinkat",
    "rename", "renameat", "renameat2", "mkdir", "mkdirat", "rmdir", "link", "linkat", "symlink",
    "symlinkat", "chmod", "fchmod", "fchmodat", "chown", "fchown", "fchownat", "lchown",
    "truncate", "mknod", "mknodat", "setrlimit", "setuid", "setgid", "setreuid", "setregid",
    "setresuid", "setresgid", "setgroups", "settimeofday", "clock_settime", "adjtimex",
    "mbind", "migrate_pages", "move_pages", "memfd_create",
)
# Refused with ENOSYS so glibc falls back to a call the filter can inspect: clone3 passes its
# flags in memory, which seccomp cannot read, and pthread_create retries with clone; openat2
# likewise passes its flags in a struct.
_NOT_IMPLEMENTED = ("clone3", "openat2")

_CLONE_THREAD = 0x00010000
_WRITE_FLAGS = (os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_TRUNC, os.O_APPEND)
_O_TMPFILE = getattr(os, "O_TMPFILE", 0o20200000)


def load_seccomp() -> Any:
    """The `seccomp` module (python3-seccomp), or None when the host lacks it."""
    try:
        import seccomp  # type: ignore[import-not-found]

        return seccomp
    except ImportError:
        pass
    added = [d for d in DEBIAN_SECCOMP_DIRS if os.path.isdir(d) and d not in sys.path]
    # Appended, and removed again at once: the system's other packages must not shadow ours.
    sys.path.extend(added)
    try:
        import seccomp  # type: ignore[import-not-found]  # noqa: F811

        return seccomp
    except ImportError:
        return None
    finally:
        for d in added:
            sys.path.remove(d)


@functools.lru_cache(maxsize=1)
def bwrap_path() -> str | None:
    """bubblewrap, when it is installed and can make the namespaces the worker needs here."""
    path = shutil.which("bwrap")
    if path is None:
        return None
    try:
        done = subprocess.run(
            [path, "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-user", "--die-with-parent",
             "--ro-bind", "/", "/", "--proc", "/proc", "--", "/bin/true"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return path if done.returncode == 0 else None


def available_layers() -> dict[str, bool]:
    """Which of layer 3's parts this host provides (`interlace serve` prints them).

    `namespaces`: bubblewrap runs the worker without network, with its own PID and IPC
    namespaces and a read-only view of the files it needs; `seccomp`: the system-call filter;
    `rlimits`: memory, CPU and file limits (always, on Linux); `process`: jobs run in a
    separate worker process with a clean environment (always).
    """
    return {
        "process": True,
        "namespaces": bwrap_path() is not None,
        "seccomp": load_seccomp() is not None,
        "rlimits": sys.platform.startswith("linux"),
    }


def _vm_data_bytes() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_cpu_limit(cpu_seconds: float) -> None:
    """Before each job: the CPU soft limit is the time used so far plus the job's allowance
    (SIGXCPU kills the worker when it is reached; the parent names the cause)."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    spent = used.ru_utime + used.ru_stime
    limit = int(spent + cpu_seconds) + 1
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (limit, hard))


def confine(*, max_memory_bytes: int | None, cpu_seconds: float, use_seccomp: bool = True) -> dict[str, bool]:
    """Apply the rlimits and the seccomp filter to this process; returns what is in force."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    if max_memory_bytes is not None:
        # The data segment (heap and private writable mappings), not the address space: torch
        # and CUDA reserve far more address space than they ever touch.
        limit = _vm_data_bytes() + int(max_memory_bytes)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    reset_cpu_limit(cpu_seconds)
    active = {"rlimits": True, "seccomp": False}
    if use_seccomp:
        seccomp = load_seccomp()
        if seccomp is not None:
            _install_filter(seccomp)
            active["seccomp"] = True
    return active


def _install_filter(seccomp: Any) -> None:
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    deny = seccomp.ERRNO(errno.EPERM)

    def rule(action: Any, name: str, *args: Any) -> None:
        try:
            f.add_rule(action, name, *args)
        except (RuntimeError, ValueError, OSError):  # a call this kernel or arch does not have
            pass

    for name in _DENIED:
        rule(deny, name)
    for name in _NOT_IMPLEMENTED:
        rule(seccomp.ERRNO(errno.ENOSYS), name)
    # Threads yes, processes no.
    rule(deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, _CLONE_THREAD, 0))
    # Sockets: only AF_UNIX (the worker's one channel is inherited; it never needs another).
    rule(seccomp.ERRNO(errno.EACCES), "socket", seccomp.Arg(0, seccomp.NE, 1))
    rule(seccomp.ERRNO(errno.EACCES), "socketpair", seccomp.Arg(0, seccomp.NE, 1))
    # Files open read-only: any write, create, truncate or append flag is refused.
    for flag in (*_WRITE_FLAGS, _O_TMPFILE):
        rule(seccomp.ERRNO(errno.EACCES), "open", seccomp.Arg(1, seccomp.MASKED_EQ, flag, flag))
        rule(seccomp.ERRNO(errno.EACCES), "openat", seccomp.Arg(2, seccomp.MASKED_EQ, flag, flag))
    # Signals only to itself (torch and Python signal their own threads with tgkill).
    me = os.getpid()
    rule(deny, "kill", seccomp.Arg(0, seccomp.NE, me))
    rule(deny, "tgkill", seccomp.Arg(0, seccomp.NE, me))
    rule(deny, "tkill")  # takes a bare thread id of any process; glibc uses tgkill instead
    # prlimit64 may read any limit (glibc's getrlimit) and set only the CPU one (pid 0 = self).
    rule(deny, "prlimit64", seccomp.Arg(0, seccomp.NE, 0))
    rule(deny, "prlimit64", seccomp.Arg(1, seccomp.NE, resource.RLIMIT_CPU), seccomp.Arg(2, seccomp.NE, 0))
    f.load()
