"""Hosted models as Ray actors: which are hot, loading or cold, their replicas, LRU eviction.

`interlace serve --ray` keeps, for each hosted model, a `ModelReplicas`: N named Ray actors
(`interlace:<model key>:<i>` in the `interlace` namespace, created with `get_if_exists=True`, so
several API processes connected to one cluster share them), each an `execution.replica.ReplicaBody`
holding the model's sandboxed worker process. A model starts cold; its first job (or a request
for its description) starts its actors ("loading"), and it is "hot" once every replica loaded
it. Before a model loads, `Replicas.ensure_hot` stops the least recently used idle models
while more than `max_hot - 1` others are loaded, or while the cluster's CPUs, GPUs or memory
(`ray.cluster_resources()`) cannot hold the loaded models' replicas and the new one's (what
each replica reserves: `--replica-cpus/--replica-gpus/--replica-memory-mb`). A replica Ray
still cannot place within `place_seconds` fails its job with a message that says what to change.

A replica whose actor died (killed, out of memory, its node lost) is dropped and replaced in
the background; `ray_runner.RayJobRunner` retries the job it held.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Final

from ..contract.policy import Policy
from ..execution.process import WorkerSpec
from .ray_options import RayResources

__all__ = ["ACTOR_NAMESPACE", "MSG_CANNOT_PLACE", "ModelReplicas", "Replica", "Replicas",
           "ReplicaStartError", "actor_name"]

log = logging.getLogger("interlace.server.ray")

#: The Ray namespace of every Interlace actor (API processes on one cluster share it).
ACTOR_NAMESPACE: Final = "interlace"
# Calls a replica actor may serve at once: a job's stream, its local-block answers, status reads.
_ACTOR_CONCURRENCY: Final = 8

MSG_CANNOT_PLACE: Final = (
    "Ray could not place a replica of {key!r} within {seconds:g} s: no node has the resources one "
    "replica asks for ({resources}), and no other model could be stopped to make room. Give the "
    "cluster more nodes, or ask for less per replica: `interlace serve --ray ... --replica-cpus 0.5 "
    "--replica-memory-mb 1024`, or keep fewer models loaded: `--max-hot-models 1`."
)


class ReplicaStartError(RuntimeError):
    """A model's replicas could not be started (placed or loaded); the message says why."""


def actor_name(model_key: str, index: int) -> str:
    return f"interlace:{model_key}:{index}"


@dataclass
class Replica:
    """The API's view of one replica actor."""

    index: int
    handle: Any
    node: str | None = None
    actor_id: str | None = None
    pid: int | None = None  # the actor's process on its node
    busy: int = 0  # jobs (or co-batches) this API process has in flight on it
    jobs: int = 0  # jobs this API process ran on it
    alive: bool = True


@dataclass
class ModelReplicas:
    """One model's replicas and state ("cold", "loading", "hot")."""

    key: str
    spec: WorkerSpec
    count: int
    state: str = "cold"
    replicas: list[Replica | None] = field(default_factory=list)
    meta: Any = None
    layers: dict[str, bool] = field(default_factory=dict)
    last_used: float = 0.0
    load_lock: threading.Lock = field(default_factory=threading.Lock)

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r is not None and r.alive]

    def busy(self) -> int:
        return sum(r.busy for r in self.live())


class Replicas:
    """Every hosted model's replicas on one Ray cluster (the caller has connected to it)."""

    def __init__(self, specs: dict[str, WorkerSpec], policy: Policy, *, replicas: int = 1,
                 resources: RayResources | None = None, max_hot: int | None = None,
                 place_seconds: float = 120.0, sandbox: bool | None = None) -> None:
        import ray

        from ..execution.replica import ReplicaBody

        self._ray = ray
        self.policy = policy
        self.resources = resources or RayResources()
        self.max_hot = max_hot
        self.place_seconds = place_seconds
        self.sandbox = sandbox
        self.models = {key: ModelReplicas(key, spec, max(1, replicas)) for key, spec in specs.items()}
        self._actor_class = ray.remote(ReplicaBody)
        self._lock = threading.Lock()  # guards routing counters and the replica lists

    # -- loading ------------------------------------------------------------------------

    def ensure_hot(self, key: str) -> ModelReplicas:
        """The model with at least one live replica, loading it first if it is cold (then
        stopping the least recently used models over `max_hot`). Raises ReplicaStartError."""
        model = self.models[key]
        model.last_used = time.monotonic()
        if model.state == "hot" and model.live():
            if len(model.live()) < model.count:
                self._refill_later(model)
            return model
        with model.load_lock:
            if model.state == "hot" and model.live():
                return model
            model.state = "loading"
            try:
                self._evict(key)
                self._start_missing(model)
            except BaseException:
                self._stop(model)
                raise
            model.state = "hot"
        return model

    def _start_missing(self, model: ModelReplicas) -> None:
        with self._lock:
            while len(model.replicas) < model.count:
                model.replicas.append(None)
            missing = [i for i, r in enumerate(model.replicas) if r is None or not r.alive]
        started = []
        for index in missing:
            handle = self._actor_class.options(
                name=actor_name(model.key, index), namespace=ACTOR_NAMESPACE, get_if_exists=True,
                max_concurrency=_ACTOR_CONCURRENCY, max_restarts=0, **self.resources.options(),
            ).remote(model.spec, self.policy, self.sandbox)
            # Both calls queue at once, so the replicas load side by side.
            started.append((index, handle, handle.where.remote(), handle.start.remote()))
        for index, handle, where_ref, start_ref in started:
            where = self._placed(model, where_ref, handle)
            try:
                loaded = self._ray.get(start_ref)
            except self._ray.exceptions.RayError as error:
                raise ReplicaStartError(_cause(error)) from None
            model.meta, model.layers = loaded["meta"], loaded["layers"]
            with self._lock:
                model.replicas[index] = Replica(index, handle, where.get("node"), where.get("actor"), where.get("pid"))
            log.info("replica %s on node %s: loaded", actor_name(model.key, index), where.get("node"))

    def _placed(self, model: ModelReplicas, ref: Any, handle: Any) -> dict[str, Any]:
        """Wait until Ray placed the actor (its cheap `where` answers), at most `place_seconds`."""
        ready, _ = self._ray.wait([ref], timeout=self.place_seconds)
        if not ready:
            self._ray.kill(handle)
            raise ReplicaStartError(MSG_CANNOT_PLACE.format(key=model.key, seconds=self.place_seconds,
                                                            resources=self.resources.text()))
        try:
            return self._ray.get(ref)
        except self._ray.exceptions.RayError as error:
            raise ReplicaStartError(_cause(error)) from None

    def fits_alone(self) -> bool:
        """Whether one model's replicas fit the whole cluster (else none can ever load)."""
        return self._need_fits(max((m.count for m in self.models.values()), default=1))

    def cluster_text(self) -> str:
        try:
            total = self._ray.cluster_resources()
        except Exception:  # noqa: BLE001 - unknown
            return "unknown resources"
        memory = total.get("memory")
        return (f"{total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU"
                + (f", {memory / 2**20:.0f} MiB" if memory else ""))

    def _fits(self, model: ModelReplicas) -> bool:
        """Whether the cluster has room for `model`'s replicas beside the other loaded models'
        (by what each replica reserves: CPUs, GPUs, memory). Unknown totals count as room."""
        loaded = sum(m.count for m in self.models.values() if m.state != "cold" and m.key != model.key)
        return self._need_fits(loaded + model.count)

    def _need_fits(self, replicas: int) -> bool:
        """Whether `replicas` replicas' reservations fit the cluster's total resources."""
        try:
            total = self._ray.cluster_resources()
        except Exception:  # noqa: BLE001 - unknown: assume there is room
            return True
        wanted = self.resources.options()
        for name, resource in (("num_cpus", "CPU"), ("num_gpus", "GPU"), ("memory", "memory")):
            need = wanted.get(name, 0) * replicas
            if need and need > total.get(resource, 0.0) + 1e-9:
                return False
        return True

    def _refill_later(self, model: ModelReplicas) -> None:
        """Replace dead replicas in the background (the live ones keep taking jobs)."""
        def refill() -> None:
            with model.load_lock:
                try:
                    if model.state == "hot":
                        self._start_missing(model)
                except (ReplicaStartError, self._ray.exceptions.RayError) as error:
                    log.warning("could not replace a replica of %s: %s", model.key, error)

        if not model.load_lock.locked():
            threading.Thread(target=refill, name=f"interlace-refill[{model.key}]", daemon=True).start()

    # -- eviction -----------------------------------------------------------------------

    def _evict(self, keep: str) -> None:
        """Before `keep` loads: stop the least recently used idle models while more than
        `max_hot - 1` others are loaded, or while the cluster has no room for `keep`'s
        replicas beside them (`_fits`). A model with a job in flight is never stopped."""
        others = sorted((m for k, m in self.models.items() if k != keep and m.state != "cold"),
                        key=lambda m: m.last_used)
        for model in others:
            hot = sum(1 for m in self.models.values() if m.state != "cold" and m.key != keep)
            over = self.max_hot is not None and hot >= self.max_hot
            if not over and self._fits(self.models[keep]):
                return
            if model.busy() or model.state == "loading":
                continue
            log.info("stopping %s's replicas (least recently used; %s)", model.key,
                     "--max-hot-models" if over else "no room on the Ray cluster")
            self._stop(model)

    def _stop(self, model: ModelReplicas) -> None:
        with self._lock:
            replicas, model.replicas = model.replicas, []
            model.state = "cold"
        for replica in replicas:
            if replica is not None:
                replica.alive = False
                try:
                    self._ray.kill(replica.handle)
                except Exception:  # noqa: BLE001 - already gone
                    pass

    # -- routing ------------------------------------------------------------------------

    def acquire(self, key: str, avoid: Replica | None = None, jobs: int = 1) -> Replica:
        """The least busy live replica of the model (ties: the one that ran fewest jobs),
        loading it if cold; counted busy until `release`. `jobs`: how many it is given (a
        co-batch is one call of several jobs)."""
        model = self.ensure_hot(key)
        with self._lock:
            live = model.live()
            choices = [r for r in live if r is not avoid] or live
            if not choices:
                raise ReplicaStartError(f"no live replica of {key!r}")
            replica = min(choices, key=lambda r: (r.busy, r.jobs, r.index))
            replica.busy += 1
            replica.jobs += jobs
            model.last_used = time.monotonic()
            return replica

    def release(self, replica: Replica) -> None:
        with self._lock:
            replica.busy -= 1

    def died(self, key: str, replica: Replica) -> None:
        """The replica's actor died: drop it; a replacement starts in the background."""
        model = self.models[key]
        with self._lock:
            replica.alive = False
            if replica.index < len(model.replicas) and model.replicas[replica.index] is replica:
                model.replicas[replica.index] = None
        try:
            self._ray.kill(replica.handle)
        except Exception:  # noqa: BLE001 - already gone
            pass
        if model.state == "hot":
            self._refill_later(model)

    # -- status -------------------------------------------------------------------------

    def states(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {key: {"state": m.state, "replicas": [
                {"id": r.actor_id, "name": actor_name(key, r.index), "node": r.node, "pid": r.pid, "busy": r.busy,
                 "jobs": r.jobs}
                for r in m.live()]} for key, m in self.models.items()}

    def close(self) -> None:
        for model in self.models.values():
            self._stop(model)


def _cause(error: BaseException) -> str:
    """A Ray error's own message: the remote exception's text when it has one."""
    cause = getattr(error, "cause", None)
    return str(cause) if cause is not None else str(error)
