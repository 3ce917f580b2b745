"""`interlace serve --ray` and its flags: what a Ray deployment asks for (light: no Ray import).

`add_ray_flags` adds the flags to `interlace serve`, `ray_options` reads them back as a
`RayOptions` (None without `--ray`), which `ray_runner.RayJobRunner` takes. Kept apart from the
runner so that building the command line imports neither Ray nor torch.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable, Final

__all__ = ["MSG_RAY_THREAD", "RayOptions", "RayResources", "add_ray_flags", "ray_options"]

MSG_RAY_THREAD: Final = ("`--ray` runs each model's sandboxed worker processes in Ray actors, so it needs "
                         "`--isolation process` (the default): drop `--isolation thread`.")


@dataclass(frozen=True)
class RayResources:
    """What Ray reserves for one replica actor (`--replica-cpus/--replica-gpus/--replica-memory-mb`)."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_mb: float | None = None

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.cpus, "num_gpus": self.gpus}
        if self.memory_mb:
            opts["memory"] = int(self.memory_mb * 2**20)
        return opts

    def text(self) -> str:
        memory = f", {self.memory_mb:g} MiB" if self.memory_mb else ""
        return f"{self.cpus:g} CPU, {self.gpus:g} GPU{memory}"


@dataclass(frozen=True)
class RayOptions:
    """`interlace serve --ray ADDRESS|auto` and its `--replica*`/`--max-hot-models` flags."""

    address: str = "auto"  # "auto": start a local Ray instance in this process
    cpus: int | None = None  # CPUs of that local instance (`--ray-cpus`; default: all)
    replicas: int = 1
    resources: RayResources = field(default_factory=RayResources)
    max_hot_models: int | None = None  # None: every model may stay loaded
    # How long a new replica may wait for Ray to place it before a least recently used model
    # is stopped to make room (and, with none to stop, before its job fails).
    place_seconds: float = 120.0


def _positive(kind: Callable[[str], Any], zero: bool = False) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(f"must be {'>=' if zero else '>'} 0, got {text}")
        return value
    return parse


def add_ray_flags(serve: argparse.ArgumentParser) -> None:
    """Scale-out on Ray (docs/deploy.md, "Ray"): each hosted model as Ray actors (replicas)."""
    serve.add_argument("--ray", metavar="ADDRESS",
                       help="run each model's workers as Ray actors: 'auto' starts a local Ray instance, "
                            "an address (HEAD_HOST:6379) joins a running cluster")
    serve.add_argument("--ray-cpus", type=_positive(int), default=None, metavar="N",
                       help="with --ray auto: CPUs of the local Ray instance (default: all)")
    serve.add_argument("--replicas", type=_positive(int), default=1, metavar="N",
                       help="with --ray: replicas (actors) per model; each job goes to the least busy (default 1)")
    serve.add_argument("--replica-cpus", type=_positive(float, zero=True), default=1.0, metavar="N",
                       help="with --ray: CPUs Ray reserves for each replica (default 1)")
    serve.add_argument("--replica-gpus", type=_positive(float, zero=True), default=0.0, metavar="N",
                       help="with --ray: GPUs Ray reserves for each replica (default 0)")
    serve.add_argument("--replica-memory-mb", type=_positive(float), default=None, metavar="MB",
                       help="with --ray: memory Ray reserves for each replica (default: none reserved)")
    serve.add_argument("--max-hot-models", type=_positive(int), default=None, metavar="K",
                       help="with --ray: models kept loaded at once; the least recently used idle one is "
                            "stopped to load another (default: all)")


def ray_options(args: argparse.Namespace) -> RayOptions | None:
    """The flags as `RayOptions`; None without `--ray`. Raises ValueError for `--isolation thread`."""
    if not getattr(args, "ray", None):
        return None
    if getattr(args, "isolation", "process") != "process":
        raise ValueError(MSG_RAY_THREAD)
    return RayOptions(address=args.ray, cpus=args.ray_cpus, replicas=args.replicas,
                      resources=RayResources(args.replica_cpus, args.replica_gpus, args.replica_memory_mb),
                      max_hot_models=args.max_hot_models)
