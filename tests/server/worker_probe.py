"""A stand-in worker for tests of the process sandbox (layer 3) on its own.

Started by `execution.process.WorkerProcess` exactly as the real worker is (bubblewrap, the
clean environment, the socketpair) and confined by the same `confine(...)`, but it runs each
job's bytes as plain Python, with no validator and no restricted runtime: what layer 3 must
hold against if layers 1 and 2 were both bypassed. A job sets `result` (JSON-able).
"""

from __future__ import annotations

import json
import socket
import sys
import traceback

from interlace.contract.policy import Policy
from interlace.execution.channel import Channel, ChannelClosed
from interlace.execution.confine import confine

__all__ = ["main"]


def main() -> int:
    fd = int(sys.argv[sys.argv.index("--fd") + 1])
    channel = Channel(socket.socket(fileno=fd))
    init, _ = channel.recv()
    policy = Policy.model_validate(init["policy"])
    active = confine(max_memory_bytes=policy.max_memory_bytes, cpu_seconds=policy.cpu_seconds)
    channel.send({"op": "ready", "layers": active}, b"null")
    while True:
        try:
            header, payload = channel.recv()
        except ChannelClosed:
            return 0
        if header.get("op") == "stop":
            return 0
        ns: dict = {}
        try:
            exec(compile(payload.decode(), "<probe>", "exec"), ns)
            channel.send({"op": "done"}, json.dumps(ns.get("result")).encode())
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            channel.send({"op": "failed", "category": type(exc).__name__,
                          "text": "".join(traceback.format_exception_only(type(exc), exc))})


if __name__ == "__main__":
    sys.exit(main())
