"""Helpers of the Ray tests: submit encoded jobs over HTTP, read job and model states."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import httpx

from interlace._version import __version__
from interlace.backends.outbound import encode_for_remote
from interlace.contract.policy import DEFAULT_POLICY
from interlace.contract.result import decode_result
from interlace.testing import ServerProcess

__all__ = ["GENEROUS_S", "RAY_AUTO", "Submitted", "Encoder", "model_state", "ray_address", "submit", "status",
           "wait_for", "wait_job", "result_of"]

#: How long a test waits for what takes seconds (a loaded 2-core machine loading models).
GENEROUS_S = 240.0
#: A local Ray instance of 2 CPUs, half a CPU per replica actor.
RAY_AUTO = ["--ray", "auto", "--ray-cpus", "2", "--replica-cpus", "0.5"]
FINAL = ("COMPLETED", "ERROR", "CANCELLED", "EXPIRED")


def _headers(key: str) -> dict[str, str]:
    return {"X-Interlace-Key": key, "X-Interlace-Version": __version__, "Content-Type": "application/octet-stream"}


class Encoder:
    """A backend that only encodes (the client's own request encoder): `with
    model.trace(prompt, backend=Encoder(key)):` leaves the job's bytes in `payload`."""

    def __init__(self, model_key: str) -> None:
        self.model_key = model_key
        self.payload = b""

    def __call__(self, trace: Any) -> dict[str, Any]:
        self.payload, _ = encode_for_remote(trace, self.model_key, DEFAULT_POLICY, strict_remote=False)
        return {}


@dataclass
class Submitted:
    id: str
    key: str


def submit(server: ServerProcess, key: str, payload: bytes) -> Submitted:
    response = httpx.post(f"{server.url}/v1/jobs", content=payload, headers=_headers(key), timeout=60)
    assert response.status_code in (200, 201, 202), response.text
    return Submitted(response.json()["id"], key)


def status(server: ServerProcess, job: Submitted) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/v1/jobs/{job.id}", headers=_headers(job.key), timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def wait_job(server: ServerProcess, job: Submitted, states: tuple[str, ...] = FINAL) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        found = status(server, job)
        return found if found["status"] in states else None

    return wait_for(reached, server, f"job {job.id} in {states}")


def result_of(server: ServerProcess, job: Submitted) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/v1/jobs/{job.id}/result", headers=_headers(job.key), timeout=60)
    assert response.status_code == 200, response.text
    return decode_result(response.content)


def model_state(server: ServerProcess, key: str, model: str) -> dict[str, Any]:
    """The model's entry in GET /v1/status (state, replicas)."""
    response = httpx.get(f"{server.url}/v1/status", headers=_headers(key), timeout=60)
    assert response.status_code == 200, response.text
    return next(m for m in response.json()["models"] if m["key"] == model)


def wait_for(check: Callable[[], Any], server: ServerProcess, what: str, timeout: float = GENEROUS_S) -> Any:
    """Poll `check` until it returns something other than None (a state, not a duration)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found is not None:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout} s\n{server.log()[-4000:]}")


def ray_address(server: ServerProcess) -> str:
    """The address of the Ray instance the server started (its start-up report names it)."""
    found = re.search(r"Ray: cluster at (\S+) ", server.log())
    assert found, server.log()[-3000:]
    return found.group(1)
