"""What a worker's parent reads of the host: the files a sandboxed worker may see, the GPU
devices, and a process's PID, CPU time and memory (from /proc). Used by `process.py`."""

from __future__ import annotations

import collections
import os
import sys

__all__ = ["cpu_seconds", "empty_dir", "gpu_devices", "hf_cache", "inside", "readable_paths", "rss_bytes",
           "worker_pid"]


def readable_paths(python_path: list[str]) -> list[str]:
    """What a sandboxed worker may read: Python, the installed packages, the import path, the
    Hugging Face cache and the few system files the loader and torch open."""
    paths = ["/usr", sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable)),
             *python_path, hf_cache()]
    for name in ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf", "passwd", "group",
                 "alternatives"):
        paths.append(f"/etc/{name}")
    paths += ["/sys/devices/system/cpu", "/sys/fs/cgroup"]
    if gpu_devices():
        paths += ["/sys", "/proc/driver/nvidia"]
    seen: list[str] = []
    for p in paths:
        if p and os.path.exists(p) and p not in seen and not (p.startswith("/usr/") and "/usr" in seen):
            seen.append(p)
    return seen


def inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def hf_cache() -> str:
    explicit = os.environ.get("HF_HUB_CACHE")
    if explicit:
        return explicit
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def gpu_devices() -> list[str]:
    try:
        return sorted(f"/dev/{n}" for n in os.listdir("/dev") if n.startswith("nvidia"))
    except OSError:
        return []


def empty_dir() -> str:
    import tempfile

    return tempfile.gettempdir()


def worker_pid(root: int) -> int | None:
    """The Python process bubblewrap started (its deepest descendant): the one to measure."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        children[int(fields[1])].append(int(name))
    pid, depth = root, 0
    frontier = [(root, 0)]
    while frontier:
        current, d = frontier.pop()
        if d > depth:
            pid, depth = current, d
        frontier.extend((c, d + 1) for c in children.get(current, ()))
    return pid if pid != root else None


def cpu_seconds(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def rss_bytes(pid: int | None) -> int | None:
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
