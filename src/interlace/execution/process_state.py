"""Process-wide state a job can change and the next job would see (the sandbox's layer 4).

Random number generators (torch's, CUDA's, `random`'s, numpy's), torch's default dtype and
device, entered-and-never-left torch function and dispatch modes (`torch.device("meta").__enter__()`),
thread count, numeric flags (`torch.backends.*`, matmul precision, deterministic algorithms,
anomaly detection, autocast) and print options (torch's and numpy's). `capture()` reads them
(about 30 microseconds); `restore(state)` sets back what differs and names it.

Each entry is a (name, read, write) triple, built once: an entry a torch build lacks is left
out, so the same code serves CPU and CUDA builds.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import numpy as np
import torch
import torch._tensor_str as _tensor_str

__all__ = ["capture", "restore", "ENTRIES"]

_Entry = tuple[str, Callable[[], Any], Callable[[Any], None]]


def _attr(owner: Any, name: str, label: str) -> _Entry:
    return (label, lambda: getattr(owner, name), lambda v: setattr(owner, name, v))


def _entries() -> list[_Entry]:
    e: list[_Entry] = [
        ("torch.get_default_dtype", torch.get_default_dtype, torch.set_default_dtype),
        ("torch.get_num_threads", torch.get_num_threads, torch.set_num_threads),
        ("torch.get_float32_matmul_precision", torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
        ("torch.use_deterministic_algorithms",
         lambda: (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()),
         lambda v: torch.use_deterministic_algorithms(v[0], warn_only=v[1])),
        ("torch.autograd.set_detect_anomaly",
         lambda: (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
         lambda v: torch.autograd.set_detect_anomaly(v[0], v[1])),
        ("torch.set_warn_always", torch.is_warn_always_enabled, torch.set_warn_always),
        ("torch print options", lambda: dict(vars(_tensor_str.PRINT_OPTS)),
         lambda v: vars(_tensor_str.PRINT_OPTS).update(v)),
        ("numpy print options", np.get_printoptions, lambda v: np.set_printoptions(**v)),
        ("numpy error handling", np.geterr, lambda v: np.seterr(**v)),
        ("random state", random.getstate, random.setstate),
    ]
    for device in ("cpu", "cuda"):
        try:
            torch.is_autocast_enabled(device)
        except (RuntimeError, TypeError):
            continue
        e.append((f"torch autocast ({device})",
                  lambda d=device: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)),
                  lambda v, d=device: (torch.set_autocast_enabled(d, v[0]), torch.set_autocast_dtype(d, v[1]))))
    backends = torch.backends
    for owner, names, prefix in (
        (getattr(backends, "cudnn", None), ("enabled", "benchmark", "deterministic", "allow_tf32"), "torch.backends.cudnn"),
        (getattr(getattr(backends, "cuda", None), "matmul", None),
         ("allow_tf32", "allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction"),
         "torch.backends.cuda.matmul"),
        (getattr(backends, "mkldnn", None), ("enabled",), "torch.backends.mkldnn"),
        (getattr(backends, "opt_einsum", None), ("enabled", "strategy"), "torch.backends.opt_einsum"),
    ):
        for name in names:
            try:
                getattr(owner, name)
            except (AttributeError, RuntimeError, TypeError):
                continue
            e.append(_attr(owner, name, f"{prefix}.{name}"))
    cuda = getattr(backends, "cuda", None)
    for kind in ("flash", "mem_efficient", "math", "cudnn"):
        read, write = getattr(cuda, f"{kind}_sdp_enabled", None), getattr(cuda, f"enable_{kind}_sdp", None)
        if read is not None and write is not None:
            e.append((f"torch.backends.cuda.enable_{kind}_sdp", read, write))
    return e


ENTRIES: list[_Entry] = _entries()


class State:
    """What `capture` read; `restore` puts it back."""

    __slots__ = ("values", "torch_rng", "numpy_rng", "cuda_rng", "function_modes", "dispatch_modes",
                 "device_context", "grad")

    def __init__(self) -> None:
        self.values = [read() for _, read, _ in ENTRIES]
        self.torch_rng = torch.get_rng_state()
        self.numpy_rng = np.random.get_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.function_modes = torch._C._len_torch_function_stack()
        self.dispatch_modes = torch._C._len_torch_dispatch_stack()
        self.device_context = getattr(torch._GLOBAL_DEVICE_CONTEXT, "device_context", None)
        self.grad = torch.is_grad_enabled()


def capture() -> State:
    return State()


def restore(state: State, unrestored: list[str]) -> list[str]:
    """Set back what differs from `state`; returns the names that differed. A name that could
    not be set back is added to `unrestored`."""
    changed = []
    # Modes a job entered and never left (`torch.device("meta").__enter__()`, a TorchFunctionMode):
    # popped, innermost first. One it left that was there before cannot be put back.
    for label, length, now, pop in (
        ("torch function modes", state.function_modes, torch._C._len_torch_function_stack,
         torch._C._pop_torch_function_stack),
        ("torch dispatch modes", state.dispatch_modes, torch._C._len_torch_dispatch_stack,
         torch._C._pop_torch_dispatch_stack),
    ):
        if now() != length:
            changed.append(label)
            while now() > length:
                pop()
            if now() != length:
                unrestored.append(label)
    if getattr(torch._GLOBAL_DEVICE_CONTEXT, "device_context", None) is not state.device_context:
        changed.append("torch.set_default_device")
        torch._GLOBAL_DEVICE_CONTEXT.device_context = state.device_context
    if torch.is_grad_enabled() != state.grad:
        changed.append("torch.set_grad_enabled")
        torch.set_grad_enabled(state.grad)
    for (name, read, write), value in zip(ENTRIES, state.values):
        try:
            if read() != value:
                changed.append(name)
                write(value)
        except Exception:  # noqa: BLE001 - a setting that cannot be set back: replace the worker
            unrestored.append(name)
    # Generators: always set back (cheaper than comparing numpy's 2.5 KB state).
    torch.set_rng_state(state.torch_rng)
    np.random.set_state(state.numpy_rng)
    if state.cuda_rng is not None:
        torch.cuda.set_rng_state_all(state.cuda_rng)
    return changed
