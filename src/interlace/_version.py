"""The package version and the client/server protocol version."""

__all__ = ["PROTOCOL_VERSION", "__version__"]

__version__ = "0.1.0"
#: Version of the client/server protocol and wire format; a major mismatch is refused.
PROTOCOL_VERSION = 1
