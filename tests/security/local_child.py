"""A child process that runs hazardous attempts under `remote='local'` for the suite.

An attempt that would hang, crash or bloat the process running it (an endless loop, a
segfault, gigabytes of memory) must not take pytest with it when it escapes, so under
`remote='local'` such attempts run here: the same `LocalSimulationBackend`, the same policy,
the same secret in the environment, one attempt file per request line on stdin
(`{"path": ...}`), one JSON outcome line on stdout. The parent kills and restarts this
process when an attempt hangs or kills it.

Usage: python local_child.py MODEL_PATH POLICY_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from security_harness import PROMPT, run_source

__all__: list[str] = []


def main() -> None:
    import interlace
    from interlace.backends.simulation import LocalSimulationBackend
    from interlace.contract.policy import Policy

    torch.set_num_threads(1)
    model = interlace.LanguageModel(sys.argv[1])
    policy = Policy.model_validate(json.loads(sys.argv[2]))
    interlace.CONFIG.APP.REMOTE_LOGGING = False
    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        backend = LocalSimulationBackend(model, policy=policy, isolate=bool(request.get("isolate")))
        namespace = {"model": model, "PROMPT": PROMPT, "BACKEND": backend,
                     "__name__": "attempt"}
        namespace["__before__"] = set(namespace) | {"__before__", "__builtins__"}
        outcome = run_source(Path(request["path"]), namespace)
        out.write(json.dumps({"refused": outcome.refused, "text": outcome.text[-400_000:],
                              "seconds": outcome.seconds, "log_bytes": outcome.log_bytes,
                              "client_error": outcome.client_error}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
