"""Which `interlace serve` the real-server test suites start: embedded (the default) or on Ray.

The suites that start real servers (`real_server` in tests/conftest.py, `limits_server` in
tests/streaming/conftest.py, the co-batching servers in tests/cobatch/test_server_cobatch.py)
add `serve_args()` to their own flags. With INTERLACE_TEST_SERVER_FLAVOR=ray they serve the
same models through `--ray auto` (a local Ray instance of 2 CPUs, each model one replica
actor), so the very same tests check the Ray mode: tests/ray/test_suites_on_ray.py runs them so.
"""

from __future__ import annotations

import os

__all__ = ["FLAVOR_ENV", "FLAVORS", "RAY_ARGS", "flavor", "serve_args"]

FLAVOR_ENV = "INTERLACE_TEST_SERVER_FLAVOR"
FLAVORS = ("embedded", "ray")
#: Half a CPU per replica: three models' replicas fit a 2-CPU Ray instance.
RAY_ARGS = ("--ray", "auto", "--ray-cpus", "2", "--replica-cpus", "0.5")


def flavor() -> str:
    value = os.environ.get(FLAVOR_ENV, "embedded")
    if value not in FLAVORS:
        raise ValueError(f"{FLAVOR_ENV}={value!r}: use one of {', '.join(FLAVORS)}")
    return value


def serve_args(*args: str) -> list[str]:
    """`args`, plus the flags of this run's server flavor."""
    return [*args, *(RAY_ARGS if flavor() == "ray" else ())]
