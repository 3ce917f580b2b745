"""`RayJobRunner`: the job runner of `interlace serve --ray`: hosted models as Ray actors.

The API process does what it does with `ProcessJobRunner` (`runner.py`): it decodes and
validates each payload (`prepare`) and never runs user code or holds weights. Running a job
goes to a replica of its model (`ray_replicas.py`): the least busy live one, loaded on
demand. A replica is a Ray actor whose body (`execution/replica.py`) holds the model's
`WorkerSupervisor`, the same sandboxed worker process the embedded server runs.

One job is one streaming call to its replica: the API reads its events as they come (printed
lines go to `log` at once) and answers its local blocks (`with interlace.local():`) through
the job's `LocalPeer` (`local_exchange.ServerLocalPeer`), sending each client message back with
another call on the same actor. A co-batch is one call (`run_batch`).

A replica that dies mid-job (killed, out of memory, its node lost) costs no job: the job runs
once more on another live replica (or the replacement), else fails with category
"replica-died" and a message that says so.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Final, Mapping, Sequence

from ..contract.local_block import LocalPeer, message_to_wire
from ..contract.model_meta import NotDescribable
from ..contract.policy import DEFAULT_POLICY, Policy
from ..execution import cobatch
from ..execution.cobatch import BatchLimits, JobOutcome
from ..execution.confine import available_layers
from ..execution.errors import JobFailed
from ..execution.local_exchange import ask_peer
from ..execution.process import WorkerSpec
from ..execution.receive import prepare_payload
from ..execution.replica import (
    EVENT_DONE,
    EVENT_FAILED,
    EVENT_LOCAL_REPLY,
    EVENT_LOCAL_START,
    EVENT_LOG,
    EVENT_TOKEN,
)
from .ray_options import RayOptions
from .ray_replicas import Replica, Replicas, ReplicaStartError
from .runner import MSG_SEVERAL_MODELS, PayloadJob

__all__ = ["CATEGORY_REPLICA_DIED", "MSG_RAY_CONNECT", "MSG_RAY_ERROR", "MSG_RAY_MISSING", "MSG_TOO_FEW_RESOURCES", "MSG_REPLICA_DIED", "MSG_REPLICA_START", "RayJobRunner",
           "connect_ray"]

log = logging.getLogger("interlace.server.ray")

#: The job's error category when its replica died twice (the first time it is retried).
CATEGORY_REPLICA_DIED: Final = "replica-died"

MSG_REPLICA_DIED: Final = (
    "ReplicaDied: the Ray replica running this job ended before it finished, twice (first {first}; "
    "then {second}): {reason}\nThis is a server problem, not your code (unless the job itself makes "
    "its replica run out of memory); submit the job again, or report it to the server's operator."
)
MSG_RAY_ERROR: Final = (
    "WorkerError: Ray could not run the job on its replica: {error}\nThis is a server problem, not "
    "your code; submit the job again, or report it to the server's operator."
)
MSG_REPLICA_START: Final = (
    "WorkerError: the model's Ray replicas could not start: {error}\nThis is a server problem, not "
    "your code; report it to the server's operator."
)
MSG_TOO_FEW_RESOURCES: Final = (
    "WARNING: one model's {replicas} replica(s) ask for {each} each, more than this Ray cluster has "
    "({total}): its jobs will wait for Ray to place them and then fail. Ask for less, e.g. "
    "`--replicas 1 --replica-cpus 0.5`, or add nodes to the cluster."
)
MSG_RAY_CONNECT: Final = (
    "cannot join the Ray cluster at {address}: {error}. Check that it runs (`ray status --address "
    "{address}`), that this host runs the same Ray and Python versions, and, if the cluster uses "
    "token authentication, that RAY_AUTH_MODE=token and its token (~/.ray/auth_token) are set here; "
    "or start a local instance with `interlace serve --ray auto`."
)
MSG_RAY_MISSING: Final = (
    "`interlace serve --ray` needs Ray, which is not installed here: pip install 'interlace[ray]' "
    "(or pip install 'ray>=2.9'), then run the command again."
)


def connect_ray(options: RayOptions) -> bool:
    """Connect to the cluster at `options.address`, or start a local instance ("auto");
    True if this call started or joined it (and `close` should leave it)."""
    try:
        import ray
    except ImportError:
        raise RuntimeError(MSG_RAY_MISSING) from None
    if ray.is_initialized():
        return False
    if options.address == "auto":
        ray.init(num_cpus=options.cpus, include_dashboard=False, namespace="interlace",
                 configure_logging=False, log_to_driver=False)
        return True
    try:
        ray.init(address=options.address, namespace="interlace", configure_logging=False, log_to_driver=False)
    except Exception as error:  # noqa: BLE001 - ConnectionError, auth, version mismatch: all one answer
        raise RuntimeError(MSG_RAY_CONNECT.format(address=options.address, error=_first_line(error))) from None
    return True


class RayJobRunner:
    """Hosts each model as `options.replicas` Ray actors; routes each job to the least busy.

    `specs` name the models as for `ProcessJobRunner` (key -> `WorkerSpec`). Nothing loads at
    start: a model's first job (or its description) starts its replicas.
    """

    def __init__(self, specs: Mapping[str, WorkerSpec], policy: Policy | None = None, *,
                 options: RayOptions | None = None, sandbox: bool | None = None) -> None:
        self._policy = policy or DEFAULT_POLICY
        self.options = options or RayOptions()
        self._owns_ray = connect_ray(self.options)
        import ray

        self._ray = ray
        self.address = ray.get_runtime_context().gcs_address
        # A replica's worker uses the CPUs Ray reserves for it (`--replica-cpus`), not this host's.
        threads = max(1, int(self.options.resources.cpus))
        specs = {key: dataclasses.replace(spec, threads=threads) for key, spec in specs.items()}
        self.replicas = Replicas(dict(specs), self._policy, replicas=self.options.replicas,
                                 resources=self.options.resources, max_hot=self.options.max_hot_models,
                                 place_seconds=self.options.place_seconds, sandbox=sandbox)

    def ray_summary(self) -> str:
        """One line for the start-up report: the cluster and what each model gets on it."""
        options = self.options
        hot = "all" if options.max_hot_models is None else str(options.max_hot_models)
        warning = ""
        if not self.replicas.fits_alone():
            warning = "\n" + MSG_TOO_FEW_RESOURCES.format(replicas=options.replicas, each=options.resources.text(),
                                                          total=self.replicas.cluster_text())
        return (f"Ray: cluster at {self.address} (namespace interlace{', started here' if self._owns_ray else ''}); "
                f"{options.replicas} replica(s) a model, each {options.resources.text()}; models loaded at once: "
                f"{hot}; models load on their first job (--ray, --replicas, --replica-cpus, --max-hot-models)."
                + warning)

    # -- JobRunner ------------------------------------------------------------------------

    def prepare(self, payload: bytes) -> PayloadJob:
        # As ProcessJobRunner: decoded and validated here, in the API process, to answer 4xx at
        # once; the replica's worker decodes the bytes again for itself.
        prepared = prepare_payload(payload, self._policy, self.replicas.models)
        return PayloadJob(prepared.model_key, payload, cobatch.share_key(prepared.request),
                          cobatch.estimated_rows(prepared.request))

    def run(self, job: PayloadJob, log_line: Callable[[str], None], local: LocalPeer | None = None) -> bytes:
        first: str | None = None
        avoid: Replica | None = None
        for attempt in (1, 2):
            replica = self._acquire(job.model_key, avoid)
            try:
                return self._stream(replica, job.payload, log_line, local)
            except self._ray.exceptions.RayActorError as error:
                self.replicas.died(job.model_key, replica)
                reason = _first_line(error)
                log.warning("replica %s of %s died during a job (attempt %d): %s", replica.index, job.model_key,
                            attempt, reason)
                if attempt == 2:
                    raise JobFailed(MSG_REPLICA_DIED.format(first=first, second=f"replica {replica.index}",
                                                            reason=reason), CATEGORY_REPLICA_DIED) from None
                first, avoid = f"replica {replica.index}", replica
            except self._ray.exceptions.RayError as error:  # the call itself broke (a Ray bug, a lost object)
                raise JobFailed(MSG_RAY_ERROR.format(error=_first_line(error)), "internal") from None
            finally:
                self.replicas.release(replica)
        raise AssertionError("unreachable")

    def _acquire(self, key: str, avoid: Replica | None, jobs: int = 1) -> Replica:
        try:
            return self.replicas.acquire(key, avoid, jobs)
        except (ReplicaStartError, self._ray.exceptions.RayError) as error:
            raise JobFailed(MSG_REPLICA_START.format(error=error), "internal") from None

    def _stream(self, replica: Replica, payload: bytes, log_line: Callable[[str], None],
                local: LocalPeer | None) -> bytes:
        """One job on `replica`: its events as they come; the result, or JobFailed."""
        token = ""
        line = 0
        stream = replica.handle.run.options(num_returns="streaming").remote(payload)
        for ref in stream:
            event = self._ray.get(ref)
            kind = event[0]
            if kind == EVENT_LOG:
                log_line(str(event[1]))
            elif kind == EVENT_TOKEN:
                token = str(event[1])
            elif kind in (EVENT_LOCAL_START, EVENT_LOCAL_REPLY):
                if kind == EVENT_LOCAL_START:
                    line = int(event[1])
                header, body = message_to_wire(ask_peer(local, kind == EVENT_LOCAL_START, line, event[-1]))
                replica.handle.local_answer.remote(token, header, body)
            elif kind == EVENT_DONE:
                return bytes(event[1])
            elif kind == EVENT_FAILED:
                raise JobFailed(str(event[1]), str(event[2]))
        raise JobFailed("WorkerError: the replica ended the job without a result; report it to the server's "
                        "operator.", "internal")

    def share_key(self, job: PayloadJob) -> Any:
        return job.share_key

    def rows(self, job: PayloadJob) -> int:
        return job.rows

    def run_batch(self, jobs: Sequence[PayloadJob], limits: BatchLimits) -> list[JobOutcome]:
        """A co-batch on one replica (one call); lost with its replica, it runs once more on
        another, else every job fails with the reason."""
        if not jobs:
            return []
        keys = {job.model_key for job in jobs}
        if len(keys) != 1:
            raise ValueError(MSG_SEVERAL_MODELS.format(keys=sorted(keys)))
        key = keys.pop()
        payloads = [job.payload for job in jobs]
        avoid: Replica | None = None
        first = ""
        for attempt in (1, 2):
            try:
                replica = self._acquire(key, avoid, len(jobs))
            except JobFailed as failed:
                return [JobOutcome(failure=failed) for _ in jobs]
            try:
                wire = self._ray.get(replica.handle.run_batch.remote(payloads, limits))
                return [JobOutcome(result=result, logs=list(logs), rows=rows,
                                   failure=None if text is None else JobFailed(text, category or "internal"))
                        for result, logs, text, category, rows in wire]
            except self._ray.exceptions.RayActorError as error:
                self.replicas.died(key, replica)
                log.warning("replica %s of %s died during a co-batch of %d jobs (attempt %d): %s", replica.index,
                            key, len(jobs), attempt, _first_line(error))
                if attempt == 2:
                    failed = JobFailed(MSG_REPLICA_DIED.format(first=first, second=f"replica {replica.index}",
                                                               reason=_first_line(error)), CATEGORY_REPLICA_DIED)
                    return [JobOutcome(failure=failed) for _ in jobs]
                first, avoid = f"replica {replica.index}", replica
            except self._ray.exceptions.RayError as error:  # a failure is each job's outcome, never raised
                failed = JobFailed(MSG_RAY_ERROR.format(error=_first_line(error)), "internal")
                return [JobOutcome(failure=failed) for _ in jobs]
            finally:
                self.replicas.release(replica)
        raise AssertionError("unreachable")

    def model_keys(self) -> list[str]:
        return list(self.replicas.models)

    def model_meta(self, model_key: str) -> dict[str, Any]:
        """The description a replica made of its model when it loaded it; a cold model that
        never loaded is loaded for it (then the description is kept)."""
        model = self.replicas.models[model_key]
        if model.meta is None:
            try:
                self.replicas.ensure_hot(model_key)
            except (ReplicaStartError, self._ray.exceptions.RayError) as error:
                raise NotDescribable(MSG_REPLICA_START.format(error=error)) from None
        meta = model.meta
        if isinstance(meta, dict) and "not_describable" in meta:
            raise NotDescribable(str(meta["not_describable"]))
        return meta

    def policy(self) -> dict[str, Any]:
        return self._policy.to_json()

    # -- optional (server/types.py) ---------------------------------------------------------

    def concurrency(self, model_key: str) -> int:
        """Jobs of the model that may run at once: one per replica."""
        return self.replicas.models[model_key].count

    def model_states(self) -> dict[str, dict[str, Any]]:
        """Each model: "hot", "loading" or "cold", and its live replicas (actor id, node,
        jobs in flight, jobs run through this API process)."""
        return self.replicas.states()

    def layers(self) -> dict[str, bool]:
        """The sandbox layers of the loaded replicas' workers (before any loads: this host's)."""
        merged: dict[str, bool] = {}
        for model in self.replicas.models.values():
            for name, on in model.layers.items():
                merged[name] = merged.get(name, True) and on
        return merged or available_layers()

    def close(self) -> None:
        self.replicas.close()
        if self._owns_ray:
            self._ray.shutdown()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
