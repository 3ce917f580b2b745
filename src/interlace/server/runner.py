"""The server's job runner: hosts models by key and runs their jobs one at a time.

Receiving and running a job are the execution layer's (`execution/`), which the simulation
calls too; this class adds what only a server has: several hosted models, a lock per model,
and a pristine copy of each model's weights to undo a job that changed them.

Two runners, one protocol (`types.JobRunner`): `ProcessJobRunner` (the default of `interlace
serve`, `--isolation process`) runs each model's jobs in a confined worker process
(`execution/process.py`): the API process only receives and validates payloads and never
runs user code or holds the weights; `DefaultJobRunner` (`--isolation thread`) runs them in a
thread of the API process, beside the loaded model.

Both are `types.BatchingJobRunner`s too (co-batching): `share_key(job)` and `rows(job)` come
from `execution/cobatch.py`'s rule, and `run_batch(jobs, limits)` runs several queued jobs
of one model through `cobatch.run_batch`: here under the model's lock, or in the model's
worker process as one message (`WorkerSupervisor.run_batch`, which runs each job again alone
if the worker dies during the batch).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from ..contract.local_block import LocalPeer
from ..contract.model_meta import NotDescribable, describe_model
from ..contract.policy import DEFAULT_POLICY, Policy
from ..execution import cobatch
from ..execution.cobatch import BatchLimits, JobOutcome, ShareKey
from ..execution.integrity import guard_for
from ..execution.receive import PreparedRequest, prepare_payload
from ..execution.process import WorkerSpec, WorkerSupervisor
from ..execution.run import run_prepared

__all__ = ["DefaultJobRunner", "MSG_SEVERAL_MODELS", "PayloadJob", "ProcessJobRunner"]


class DefaultJobRunner:
    """Hosts models by key; one job at a time per model (the server keeps one worker per key)."""

    def __init__(self, models: Mapping[str, Any], policy: Policy | None = None) -> None:
        self.models = dict(models)
        self._policy = policy or DEFAULT_POLICY
        self._locks = {key: threading.Lock() for key in self.models}
        # Each model's baseline, with a CPU copy of its weights, to undo what a job changed
        # (invariant 7: one user cannot affect another; `execution/integrity.py`). Costs host
        # memory equal to the models' size.
        for model in self.models.values():
            guard_for(model, server=True)

    def prepare(self, payload: bytes) -> PreparedRequest:
        return prepare_payload(payload, self._policy, self.models)

    def run(self, job: PreparedRequest, log: Callable[[str], None], local: LocalPeer | None = None) -> bytes:
        with self._locks[job.model_key]:
            model = self.models[job.model_key]
            return run_prepared(job, model, self._policy, log, local=local)

    def share_key(self, job: PreparedRequest) -> ShareKey | None:
        return cobatch.share_key(job.request)

    def rows(self, job: PreparedRequest) -> int:
        return cobatch.estimated_rows(job.request)

    def run_batch(self, jobs: Sequence[PreparedRequest], limits: BatchLimits) -> list[JobOutcome]:
        if not jobs:
            return []
        key = _one_model(jobs)
        with self._locks[key]:
            return cobatch.run_batch(list(jobs), self.models[key], self._policy, limits)

    def model_keys(self) -> list[str]:
        return list(self.models)

    def model_meta(self, model_key: str) -> dict[str, Any]:
        """Config and tokenizer files of a hosted model, for clients without its weights
        (GET /v1/models/{key}/meta). Read-only, so it needs no job lock."""
        return describe_model(self.models[model_key])

    def policy(self) -> dict[str, Any]:
        return self._policy.to_json()


@dataclass
class PayloadJob:
    """A job accepted by `ProcessJobRunner.prepare`: its model key and its bytes, which go to
    the model's worker as they came (the worker decodes them for itself); its co-batching
    `share_key` and `rows`, worked out at prepare from the request decoded there, so the
    server can gather jobs without decoding them again."""

    model_key: str
    payload: bytes
    share_key: ShareKey | None = None
    rows: int = 1


MSG_SEVERAL_MODELS = ("run_batch got jobs of several models {keys}; a batch comes from one model's queue: "
                      "runner.run_batch([job for job in jobs if job.model_key == key], limits)")


def _one_model(jobs: Sequence[Any]) -> str:
    keys = {job.model_key for job in jobs}
    if len(keys) != 1:
        raise ValueError(MSG_SEVERAL_MODELS.format(keys=sorted(keys)))
    return keys.pop()


class ProcessJobRunner:
    """Hosts each model in its own worker process; one job at a time per model.

    `specs` name the models (key -> `WorkerSpec`: how the worker loads it, what it may read).
    The workers start here, one after the other, so a model that cannot load stops the server
    at start; a worker that dies later is replaced by its `WorkerSupervisor`.
    """

    def __init__(self, specs: Mapping[str, WorkerSpec], policy: Policy | None = None, *,
                 sandbox: bool | None = None) -> None:
        self._policy = policy or DEFAULT_POLICY
        # Started in this thread on purpose: a worker is told to die with the thread that
        # started it (PR_SET_PDEATHSIG), and this one lives as long as the server.
        self.supervisors = {key: WorkerSupervisor(spec, self._policy, sandbox=sandbox) for key, spec in specs.items()}
        try:
            for supervisor in self.supervisors.values():
                supervisor.start()
        except BaseException:
            self.close()
            raise

    def prepare(self, payload: bytes) -> PayloadJob:
        # Decoded and validated here, in the API process, to answer 4xx at once; no user code
        # runs in this step (decoding rebuilds values, the body runs only in the worker).
        prepared = prepare_payload(payload, self._policy, self.supervisors)
        return PayloadJob(prepared.model_key, payload, cobatch.share_key(prepared.request),
                          cobatch.estimated_rows(prepared.request))

    def run(self, job: PayloadJob, log: Callable[[str], None], local: LocalPeer | None = None) -> bytes:
        # The worker asks its parent for local blocks over its channel; the supervisor relays
        # them to `local` (the server's HTTP side).
        return self.supervisors[job.model_key].run(job.payload, log, local=local)

    def share_key(self, job: PayloadJob) -> ShareKey | None:
        return job.share_key

    def rows(self, job: PayloadJob) -> int:
        return job.rows

    def run_batch(self, jobs: Sequence[PayloadJob], limits: BatchLimits) -> list[JobOutcome]:
        # One message to the model's worker, which decodes and runs them (`worker.py`).
        if not jobs:
            return []
        return self.supervisors[_one_model(jobs)].run_batch([job.payload for job in jobs], limits)

    def model_keys(self) -> list[str]:
        return list(self.supervisors)

    def model_meta(self, model_key: str) -> dict[str, Any]:
        """The description the worker made of its model when it loaded it (the API process
        holds no weights)."""
        meta = self.supervisors[model_key].meta
        if isinstance(meta, dict) and "not_describable" in meta:
            raise NotDescribable(str(meta["not_describable"]))
        return meta

    def policy(self) -> dict[str, Any]:
        return self._policy.to_json()

    def layers(self) -> dict[str, bool]:
        """Which of the sandbox's process layers are in force (for the start-up report)."""
        merged: dict[str, bool] = {}
        for supervisor in self.supervisors.values():
            for name, on in supervisor.layers.items():
                merged[name] = merged.get(name, True) and on
        return merged

    def close(self) -> None:
        for supervisor in self.supervisors.values():
            supervisor.close()

