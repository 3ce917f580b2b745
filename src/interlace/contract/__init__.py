"""The contract: what client and server must agree on.

The wire format (`wire/`), the value codec (`values/`), shipped code (`code/`), the request and
result schemas, the policy, the validator and the problems it reports, and the HTTP protocol.
Nothing here runs a model or opens a connection.
"""

from __future__ import annotations

from .policy import DEFAULT_POLICY, Policy
from .problems import Problem, RemoteValidationError

__all__ = ["DEFAULT_POLICY", "Policy", "Problem", "RemoteValidationError"]
