"""The shapes a failure takes at the execution seam (see `server/types.JobRunner`).

`BadRequest` is raised while a payload is received (`JobRunner.prepare`) and becomes an HTTP
4xx answer; `JobFailed` is raised while a job runs (`JobRunner.run`) and becomes the job's
ERROR status. Both carry text meant for the user, so they must say what to fix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..contract.problems import Problem

__all__ = ["ALLOWED_BAD_REQUEST_STATUS", "BadRequest", "JobFailed"]

ALLOWED_BAD_REQUEST_STATUS = (400, 404, 409, 413, 422)


class BadRequest(Exception):
    """The submitted payload cannot be accepted.

    status: 400 undecodable bytes, 404 unknown model, 413 too large, 422 validation problems
    (then `problems` lists them as `contract.problems.Problem`s; they become JSON only at the
    HTTP edge, `to_json`).
    """

    def __init__(
        self,
        message: str,
        status: int = 400,
        problems: "list[Problem] | None" = None,
    ) -> None:
        if status not in ALLOWED_BAD_REQUEST_STATUS:
            raise ValueError(f"BadRequest status must be one of {ALLOWED_BAD_REQUEST_STATUS}, got {status}")
        super().__init__(message)
        self.message = message
        self.status = status
        self.problems = problems

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"detail": self.message}
        if self.problems is not None:
            body["problems"] = [p.model_dump() for p in self.problems]
        return body


class JobFailed(Exception):
    """The job ran and failed; `traceback_text` is shown to the user as the job's ERROR.

    category: a short machine-readable kind, e.g. "user" (their code raised), "timeout",
    "memory", "result_too_large", "internal".
    """

    def __init__(self, traceback_text: str, category: str = "user") -> None:
        super().__init__(traceback_text)
        self.traceback_text = traceback_text
        self.category = category

