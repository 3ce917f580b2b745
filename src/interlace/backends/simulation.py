"""`remote='local'`: the full remote path, in-process, against the local model.

Serialize (`outbound.py`) → receive: decode and validate (`execution.receive`) → run beside
the model and encode the result (`execution.run`) → decode the result (`contract.result`).
Each step is the function the client and the server use, so what passes here passes remotely
and what fails remotely fails here, with the same message. It is to the server what httpx's
ASGITransport is to a web app: the real thing, in process.
"""

from __future__ import annotations

import sys
from typing import Any

from ..contract.problems import RemoteValidationError
from ..errors import RemoteException
from ..contract.code.decode import shipped_model_refs
from ..contract.result import decode_result
from ..execution.errors import BadRequest, JobFailed
from ..execution.receive import prepare_payload
from ..execution.run import run_prepared
from ..tracing.backend import CapturedTrace
from .outbound import encode_for_remote, model_key_of, policy_for_simulation, warn_if_large

__all__ = ["LocalSimulationBackend"]


class LocalSimulationBackend:
    """Runs traces through serialize, validate, deserialize and execute, in-process.

    `last_payload_size` is the size in bytes of the last request; `get_last_payload()` returns
    its bytes.
    """

    def __init__(
        self,
        model: Any,
        verbose: bool = False,
        *,
        strict_remote: bool = False,
        max_upload_mb: float = 10.0,
        policy: Any = None,
    ) -> None:
        self.model = model
        self.verbose = verbose
        self.strict_remote = strict_remote
        self.max_upload_mb = max_upload_mb
        self.policy = policy
        self.last_payload_size = 0
        self._last_payload: bytes | None = None

    def get_last_payload(self) -> bytes | None:
        return self._last_payload

    def __call__(self, trace: CapturedTrace) -> dict[str, Any]:
        policy = self.policy or policy_for_simulation()
        key = model_key_of(self.model, simulation=True)
        payload, built = encode_for_remote(trace, key, policy, strict_remote=self.strict_remote)
        self.last_payload_size = len(payload)
        self._last_payload = payload
        if self.verbose:
            request = built.request
            print(f"[LocalSimulation] Serialized payload: {len(payload)} bytes")
            print(f"[LocalSimulation] Variables: {sorted(request.variables)}")
            print(f"[LocalSimulation] Remote objects: {request.remote_objects}")
            print(f"[LocalSimulation] Model refs: {sorted(request.model_refs)}")
            shipped_refs = shipped_model_refs(request)
            if shipped_refs:
                print(f"[LocalSimulation] Model refs in shipped code: {shipped_refs}")
        warn_if_large(payload, self.max_upload_mb)
        try:
            prepared = prepare_payload(payload, policy, {key: self.model})
        except BadRequest as e:
            if e.problems:
                raise RemoteValidationError(e.problems) from None
            raise RemoteException(e.message, category=f"HTTP {e.status}") from None
        try:
            result = run_prepared(prepared, self.model, policy, log=_log)
        except JobFailed as e:
            raise RemoteException(e.traceback_text, category=e.category) from None
        return decode_result(result)


def _log(line: str) -> None:
    print(line, file=sys.stdout)
