"""The execution layer: what the server and the simulation share.

Receive bytes -> a validated request (`receive.py`), run it beside a hosted model and encode
the saved values (`run.py`), and leave the model as the job found it (`isolation.py`);
`hosted.py` says what a model must offer to host jobs. A body's `with interlace.local():`
blocks run on the client through a `LocalPeer` given to `run_prepared(..., local=)`
(`local_exchange.py`; across a worker process, `local_channel.py`).
Failures take two shapes (`errors.py`): `BadRequest` before a job runs, `JobFailed` when it ran.
"""

from .errors import BadRequest, JobFailed
from .hosted import HostedModel
from .local_exchange import LocalBlockAborted, LocalBlocks
from .receive import PreparedRequest, prepare_payload
from .run import execute_request, run_prepared, user_traceback

__all__ = ["BadRequest", "HostedModel", "JobFailed", "LocalBlockAborted", "LocalBlocks", "PreparedRequest",
           "execute_request", "prepare_payload", "run_prepared", "user_traceback"]
