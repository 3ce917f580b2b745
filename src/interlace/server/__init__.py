"""The Interlace server: HTTP API, durable job store, result store and worker pool.

Start one with `interlace serve` (see `interlace.cli`) or `server.app.create_app`; the protocol
it speaks is `interlace.contract.http`, described in full in docs/http-api.md.
"""

__all__: list[str] = []
