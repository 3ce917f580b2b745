"""The `interlace` command: serve, keys, jobs (the local job history), env.

Heavy imports (the server app, models, torch) happen inside the command that needs them, so
`interlace keys list` and `interlace --help` stay quick.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from ._version import PROTOCOL_VERSION, __version__
from .server.ray_options import add_ray_flags, ray_options

__all__ = ["main", "build_parser", "FAKE_RUNNER_ENV"]

FAKE_RUNNER_ENV = "INTERLACE_TEST_FAKE_RUNNER"


def _fail(message: str, code: int = 2) -> int:
    print(f"interlace: error: {message}", file=sys.stderr)
    return code


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _data_dir(args: argparse.Namespace) -> Path:
    from .server.settings import default_data_dir

    return Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()


def _open_db(args: argparse.Namespace):
    """The server's database: SQLite in the data dir, or the `--store postgresql://...` one."""
    from .server.db import open_database, redact_url

    data_dir = _data_dir(args)
    store = getattr(args, "store", None)
    return open_database(store, data_dir), (redact_url(store) if store else data_dir)


# -- serve ------------------------------------------------------------------------------------


def _build_runner(models: list[str], data_dir: Path, policy: Any, isolation: str = "process",
                  ray: Any = None) -> Any:
    """Load the hosted models and wrap them in the engine's job runner (imported lazily).

    `isolation="process"`: each model is loaded by its own confined worker process
    (`server.runner.ProcessJobRunner`); `"thread"`: loaded here, jobs in threads of this process."""
    if os.environ.get(FAKE_RUNNER_ENV) == "1":
        from .testing import FakeRunner

        print(f"WARNING: {FAKE_RUNNER_ENV}=1 -> serving the fake runner (interlace.testing.FakeRunner), no real models.",
              file=sys.stderr)
        return FakeRunner(models or None, policy)
    paths: dict[str, str] = {}
    if not models:
        from .models.demo import DEMO_MODEL_KEY, build_demo_model

        paths[DEMO_MODEL_KEY] = str(build_demo_model(data_dir))
    for model in models:
        paths[model] = model
    if isolation == "process":
        import torch

        from .execution.process import WorkerSpec
        from .server.runner import ProcessJobRunner

        specs = {
            key: WorkerSpec(key, {"kind": "language_model", "path": path},
                            read_paths=(str(Path(path).resolve()),) if Path(path).exists() else (),
                            hidden_paths=(str(data_dir.resolve()),), threads=torch.get_num_threads())
            for key, path in paths.items()
        }
        if ray is not None:  # `--ray`: the same worker specs, each model's workers in Ray actors
            from .server.ray_runner import RayJobRunner

            return RayJobRunner(specs, policy=policy, options=ray)
        return ProcessJobRunner(specs, policy=policy)
    from .server.runner import DefaultJobRunner
    import interlace

    loaded = {key: interlace.LanguageModel(path, dispatch=True) for key, path in paths.items()}
    return DefaultJobRunner(loaded, policy=policy)


def _sandbox_layers(isolation: str) -> dict[str, bool]:
    """Which of the sandbox's process layers (layer 3) this host and `--isolation` give."""
    if isolation != "process" or os.environ.get(FAKE_RUNNER_ENV) == "1":
        return {"process": False, "namespaces": False, "seccomp": False, "rlimits": False}
    from .execution.confine import available_layers

    return available_layers()


MSG_NO_SANDBOX = (
    "refusing to listen on {host}: jobs run user code and this server's process sandbox (layer 3) "
    "is incomplete here (missing: {missing}), so anyone who can reach this port with a key could "
    "run code on this machine. Install it (`apt-get install bubblewrap python3-seccomp`, see "
    "scripts/setup.sh) and serve with `--isolation process` (the default), or bind to 127.0.0.1 "
    "(the default) and reach it through an SSH tunnel, or pass --insecure if every key holder is trusted."
)


def _policy_from_args(args: argparse.Namespace) -> Any:
    """The policy this server serves and enforces, from `interlace serve`'s limit flags."""
    from .contract.policy import DEFAULT_POLICY
    from .server.settings import MiB

    # Every limit is this policy's: the runner enforces the per-job ones, the app reads the
    # upload and per-key ones from the policy the runner serves (one source, GET /v1/policy).
    return DEFAULT_POLICY.model_validate({
        **DEFAULT_POLICY.model_dump(),
        "max_upload_bytes": int(args.max_upload_mb * MiB),
        "max_result_bytes": int(args.max_result_mb * MiB),
        "timeout_seconds": args.job_timeout,
        "cpu_seconds": args.job_cpu_seconds,
        "max_memory_bytes": int(args.job_memory_mb * MiB),
        "max_log_bytes": int(args.max_log_kb * 1024),
        "max_queued_per_key": args.max_queued_per_key,
        "requests_per_minute": args.requests_per_minute,
        "local_block_seconds": args.local_block_timeout,
        "local_grace_seconds": args.local_grace,
    })


def cmd_serve(args: argparse.Namespace) -> int:
    from .server.settings import ServerSettings, is_loopback

    if args.threads is not None or "OMP_NUM_THREADS" not in os.environ:
        import torch

        # The event loop answers status and downloads while a job computes; on CPU, a
        # forward that takes every core makes both slower.
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    data_dir = _data_dir(args)
    layers = _sandbox_layers(args.isolation)
    missing = [name for name, on in layers.items() if not on]
    if not is_loopback(args.host) and not args.insecure and missing:
        return _fail(MSG_NO_SANDBOX.format(host=args.host, missing=", ".join(missing)))
    settings = ServerSettings(
        data_dir=data_dir, host=args.host, port=args.port, insecure=args.insecure,
        result_ttl=args.result_ttl, result_store=args.result_store, store=args.store,
        advertise_url=args.advertise_url,
        sweep_interval=args.sweep_interval, cobatch=not args.no_cobatch, batch_rows=args.batch_rows,
        batch_tokens=args.batch_tokens, batch_wait_ms=args.batch_wait_ms,
    )
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not is_loopback(args.host) and missing:
        banner = "!" * 78
        print(f"{banner}\nWARNING: --insecure: listening on {args.host}. Jobs run user code WITHOUT the full "
              f"process sandbox\n(missing: {', '.join(missing)}); anyone holding an API key can run code on "
              f"this machine as this user.\n{banner}",
              file=sys.stderr)
    try:
        runner = _build_runner(args.model or [], data_dir, _policy_from_args(args), args.isolation,
                               ray=ray_options(args))
    except (RuntimeError, ValueError) as exc:  # `--ray`: no Ray here, a cluster it cannot reach, --isolation thread
        return _fail(str(exc))
    except ImportError as exc:
        return _fail(f"cannot load the job runner or models: {exc}. Is Interlace fully installed?")

    import uvicorn

    from .server.app import create_app

    try:
        app = create_app(settings, runner)
    except (ImportError, OSError, ValueError, RuntimeError) as exc:
        # Typically a result-store URL whose filesystem package is missing (s3:// needs s3fs)
        # or a data directory that cannot be written.
        return _fail(f"cannot open the server's stores (data dir {data_dir}, results "
                     f"{settings.result_url}): {exc}")
    no_keys = app.state.service.keys.count_active() == 0
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=args.log_level == "debug", ws="websockets-sansio")
    server = uvicorn.Server(config)

    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.05)
        models = ", ".join(app.state.service.model_keys)
        print(f"Interlace server {__version__} listening on {settings.base_url} (models: {models}; "
              f"data: {data_dir})", flush=True)
        active = getattr(runner, "layers", lambda: layers)()
        report = ", ".join(f"{name} {'on' if on else 'OFF'}" for name, on in active.items())
        state = "complete" if all(active.values()) else "PARTIAL"
        print(f"Sandbox layer 3 (the process, --isolation {args.isolation}): {state}: {report}", flush=True)
        print(app.state.service.cobatch_summary(), flush=True)
        if hasattr(runner, "ray_summary"):  # `--ray`: the cluster, the replicas, the resources
            print(runner.ray_summary(), flush=True)
        hint = f"interlace keys create --name YOUR_NAME --data-dir {data_dir}"
        if args.store:  # the keys live in the shared database (shown without its password)
            hint = f"interlace keys create --name YOUR_NAME --store '{app.state.service.db.describe()}'"
        if no_keys:
            print(f"No API keys yet. Create one with: {hint}", flush=True)
        else:
            print(f"Create more API keys with: {hint}", flush=True)

    async def main() -> None:
        task = asyncio.create_task(announce())
        try:
            await server.serve()
        finally:
            task.cancel()

    with asyncio.Runner(loop_factory=config.get_loop_factory()) as loop_runner:
        loop_runner.run(main())
    return 0 if server.started else 1


# -- keys, jobs ------------------------------------------------------------------------------


def cmd_keys(args: argparse.Namespace) -> int:
    from .server.auth import KeyStore

    try:
        db, data_dir = _open_db(args)
    except (RuntimeError, ValueError) as exc:  # a --store URL that is wrong or unreachable
        return _fail(str(exc))
    keys = KeyStore(db)
    if args.keys_command == "create":
        key, info = keys.create(args.name)
        # The key alone on stdout (scriptable); the explanation on stderr.
        print(f"Created API key {info.id} for user {info.name!r} in {data_dir}. It is shown only once:",
              file=sys.stderr)
        print(key, flush=True)
        print(f"Use it with: export INTERLACE_API_KEY={key}\n"
              f"or in Python: interlace.CONFIG.set_default_api_key({key!r})", file=sys.stderr)
        return 0
    if args.keys_command == "list":
        rows = keys.list_keys()
        if not rows:
            print(f"No API keys in {data_dir}. Create one with: interlace keys create --name YOUR_NAME")
            return 0
        print(f"{'KEY ID':10} {'USER':24} {'CREATED':20} STATE")
        for k in rows:
            state = f"revoked {_when(k.revoked)}" if k.revoked else "active"
            print(f"{k.id:10} {k.name:24} {_when(k.created):20} {state}")
        return 0
    if args.keys_command == "revoke":
        if keys.revoke(args.key_id):
            print(f"Revoked key {args.key_id}; it stops working immediately.")
            return 0
        return _fail(f"no active key with id {args.key_id!r}; see `interlace keys list`.", 1)
    return _fail("choose one of: keys create, keys list, keys revoke")


def cmd_jobs(args: argparse.Namespace) -> int:
    """`interlace jobs ...`: the local job history (`interlace.jobs`), or with `list
    --server-data DIR` a server's job store, for its operator."""
    if args.jobs_command == "list" and (args.server_data or args.store):
        return _server_jobs(args)
    import interlace
    from .backends.history import JobHistoryError

    try:
        if args.jobs_command == "list":
            return _print_history(interlace.jobs.list(args.limit, mode=args.mode, status=args.status))
        if args.jobs_command == "show":
            return _print_record(interlace.jobs.show(args.id))
        if args.jobs_command == "rerun":
            remote = {"local": "local", "server": True, None: None}[args.remote]
            values = interlace.jobs.rerun(args.id, remote, model_key=args.model_key)
            print(f"Reran {args.id} ({'where it ran' if remote is None else args.remote}); saved values:")
            for name, value in values.items():
                print(f"  {name}: {_describe_value(value)}")
            return 0
        if args.jobs_command == "diff":
            print(interlace.jobs.diff(args.a, args.b))
            return 0
        if args.jobs_command == "prune":
            removed = interlace.jobs.prune(args.older_than, args.keep)
            print(f"Removed {len(removed)} record{'s' if len(removed) != 1 else ''} from {interlace.jobs.path}.")
            for job_id in removed:
                print(f"  {job_id}")
            return 0
    except (JobHistoryError, ValueError) as exc:
        return _fail(str(exc), 1)
    return _fail("choose one of: jobs list, jobs show, jobs rerun, jobs diff, jobs prune")


def _server_jobs(args: argparse.Namespace) -> int:
    from .server.db import open_database, redact_url
    from .server.store import JobStore

    data_dir = Path(args.server_data or ".").expanduser()
    try:
        db = open_database(args.store, data_dir)
    except (RuntimeError, ValueError) as exc:  # a --store URL that is wrong or unreachable
        return _fail(str(exc))
    data_dir = redact_url(args.store) if args.store else data_dir  # type: ignore[assignment]
    records = JobStore(db).list_jobs(args.user, status=args.status, limit=args.limit)
    if not records:
        print(f"No jobs in {data_dir}.")
        return 0
    print(f"{'JOB ID':32} {'USER':16} {'MODEL':24} {'STATUS':10} {'CREATED':19} {'STARTED':19} FINISHED")
    for r in records:
        print(f"{r.id:32} {r.owner[:16]:16} {r.model_key[:24]:24} {r.status:10} {_when(r.created):19} "
              f"{_when(r.started):19} {_when(r.finished)}")
    return 0


def _print_history(records: list[Any]) -> int:
    from .backends.history_store import history_path

    if not records:
        print(f"No recorded jobs in {history_path()}.")
        return 0
    print(f"{'ID':12} {'CREATED':19} {'MODE':6} {'STATUS':9} {'MODEL':28} {'PAYLOAD':>8} {'RESULT':>8} BODY")
    for r in records:
        marks = "".join((" [dry run]" if r.dry_run else "", " [mocked]" if r.mocked else "",
                         f" [rerun of {r.rerun_of[:12]}]" if r.rerun_of else ""))
        print(f"{r.id[:12]:12} {_when(r.created):19} {r.mode:6} {r.status:9} {r.model_key[-28:]:28} "
              f"{r.payload_size:>8} {'-' if r.result_size is None else r.result_size:>8} "
              f"{Path(r.filename).name}:{r.lineno}{marks}")
    return 0


def _print_record(r: Any) -> int:
    print(f"id:        {r.id}")
    print(f"created:   {_when(r.created)}")
    print(f"mode:      {r.mode}" + (f" ({r.host}, server job {r.server_job_id})" if r.server_job_id else ""))
    print(f"kind:      {r.kind}")
    print(f"model:     {r.model_key}" + (f" (loads from {r.model_source['path']})" if r.model_source else ""))
    print(f"status:    {r.status}")
    print("timeline:  " + "  ".join(f"{status} {time.strftime('%H:%M:%S', time.localtime(at))}.{int(at % 1 * 1000):03d}"
                                    for status, at in r.timeline))
    print(f"sizes:     payload {r.payload_size} bytes, result "
          + ("-" if r.result_size is None else f"{r.result_size} bytes")
          + (" (recorded)" if r.result is not None else ""))
    if r.dry_run:
        print("dry run:   yes (values were fake)")
    if r.mocked:
        print(f"mocked:    {', '.join(r.mocked)}")
    if r.rerun_of:
        print(f"rerun of:  {r.rerun_of}")
    if r.error is not None:
        print(f"error:     {r.error_category}")
        print("  " + r.error.rstrip("\n").replace("\n", "\n  "))
    print(f"body:      {r.filename}:{r.lineno}")
    print("  " + r.source.rstrip("\n").replace("\n", "\n  "))
    return 0


def _describe_value(value: Any) -> str:
    """One line for a saved value: a tensor's shape, dtype and mean; anything else, its repr."""
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None and dtype is not None and hasattr(value, "double"):
        mean = value.double().mean().item() if value.numel() else float("nan")
        return f"tensor {tuple(shape)} {str(dtype).removeprefix('torch.')}, mean {mean:.6g}"
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


# -- env --------------------------------------------------------------------------------------


def cmd_env(args: argparse.Namespace) -> int:
    from importlib import metadata

    from .config import CONFIG, config_path

    print(f"Interlace {__version__} (protocol {PROTOCOL_VERSION})")
    print(f"Python    {sys.version.split()[0]} on {platform.platform()}")
    local: dict[str, str] = {}
    for name in ("torch", "transformers", "safetensors", "zstandard", "numpy", "httpx", "websockets",
                 "fastapi", "uvicorn", "pydantic"):
        try:
            local[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            local[name] = "not installed"
    for name, version in local.items():
        print(f"  {name:14} {version}")
    print(f"Config file {config_path()} ({'present' if config_path().is_file() else 'absent'})")
    host = args.host or os.environ.get("INTERLACE_HOST")
    key = CONFIG.API.APIKEY
    print(f"API host  {host or CONFIG.API.HOST}; API key {'set' if key else 'not set'}")
    if not host:
        print("No server configured (set INTERLACE_HOST or pass --host to query one).")
        _print_default_policy()
        return 0
    from .backends.client import RemoteClient

    try:
        with RemoteClient(host=host) as client:
            info = client.info()
            policy = client.policy()
    except ConnectionError as exc:
        print(f"Server    unreachable: {exc}")
        _print_default_policy()
        return 1
    print(f"Server    {host}: interlace {info.get('version')} (protocol {info.get('protocol_version')}), "
          f"accepts clients {info.get('supported_client_versions')}, python {info.get('python')}")
    print(f"  models: {', '.join(info.get('models', [])) or 'none'}")
    for name, version in sorted(info.get("packages", {}).items()):
        mark = "" if local.get(name, version) == version else f"   (local: {local.get(name)})"
        print(f"  {name:14} {version}{mark}")
    print("Policy:")
    print(json.dumps(policy, indent=2, sort_keys=True))
    return 0


def _print_default_policy() -> None:
    from .contract.policy import DEFAULT_POLICY

    print("Default policy (what remote='local' checks against when no server answers):")
    print(json.dumps(DEFAULT_POLICY.to_json(), indent=2, sort_keys=True))


# -- parser -----------------------------------------------------------------------------------


def _add_limit_flags(serve: argparse.ArgumentParser) -> None:
    """The sandbox's limits per job and per key (layer 5), served in the policy (GET /v1/policy)."""
    from .contract.policy import DEFAULT_POLICY as P

    def positive(kind: Any) -> Any:
        def parse(text: str) -> Any:
            value = kind(text)
            if value <= 0:
                raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
            return value
        return parse

    serve.add_argument("--max-result-mb", type=positive(float), default=P.max_result_bytes / 2**20, metavar="MB",
                       help=f"largest result a job may return (default {P.max_result_bytes / 2**20:.0f})")
    serve.add_argument("--job-timeout", type=positive(float), default=P.timeout_seconds, metavar="SECONDS",
                       help=f"wall-clock limit of one job (default {P.timeout_seconds:.0f})")
    serve.add_argument("--job-cpu-seconds", type=positive(float), default=P.cpu_seconds, metavar="SECONDS",
                       help=f"CPU-time limit of one job (default {P.cpu_seconds:.0f})")
    serve.add_argument("--job-memory-mb", type=positive(float), default=P.max_memory_bytes / 2**20, metavar="MB",
                       help=f"memory one job may add (default {P.max_memory_bytes / 2**20:.0f})")
    serve.add_argument("--max-log-kb", type=positive(float), default=P.max_log_bytes / 1024, metavar="KB",
                       help=f"printed text kept per job; the rest is dropped (default {P.max_log_bytes / 1024:.0f})")
    serve.add_argument("--max-queued-per-key", type=positive(int), default=P.max_queued_per_key, metavar="N",
                       help=f"jobs one API key may have queued or running; more get 429 (default {P.max_queued_per_key})")
    serve.add_argument("--requests-per-minute", type=positive(int), default=P.requests_per_minute, metavar="N",
                       help=f"requests per minute per API key; more get 429 (default {P.requests_per_minute})")
    serve.add_argument("--local-block-timeout", type=positive(float), default=P.local_block_seconds,
                       metavar="SECONDS", help="longest a job waits for one `with interlace.local():` block to run "
                       f"on its client; the job's own clock is paused meanwhile (default {P.local_block_seconds:.0f})")
    serve.add_argument("--local-grace", type=positive(float), default=P.local_grace_seconds, metavar="SECONDS",
                       help="longest a job waiting for a local block waits for a client to come back when none "
                       f"follows it (default {P.local_grace_seconds:.0f})")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number > 0, got {text!r} (e.g. 64)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _batch_wait_ms(text: str) -> float:
    from .server.settings import MAX_BATCH_WAIT_MS

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of milliseconds, got {text!r} (e.g. 2)") from None
    if not 0 <= value <= MAX_BATCH_WAIT_MS:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_BATCH_WAIT_MS:g} ms, got {text} "
                                         "(0: never wait; --no-cobatch: never share)")
    return value


def _add_cobatch_flags(serve: argparse.ArgumentParser) -> None:
    """Co-batching (`execution/cobatch.py`): queued jobs of one model that may share a forward run as one."""
    from .execution.cobatch import BatchLimits

    B = BatchLimits()
    serve.add_argument("--batch-rows", type=_positive_int, default=B.max_rows, metavar="N",
                       help="co-batching: most input rows of one shared forward, all its jobs together "
                       f"(default {B.max_rows})")
    serve.add_argument("--batch-tokens", type=_positive_int, default=B.max_tokens, metavar="N",
                       help=f"co-batching: most tokens of one shared forward (default {B.max_tokens})")
    serve.add_argument("--batch-wait-ms", type=_batch_wait_ms, default=B.wait_seconds * 1000, metavar="MS",
                       help="co-batching: longest a model's worker waits, after taking a job that may share, for "
                       f"more such jobs to arrive; 0 to 1000 (default {B.wait_seconds * 1000:g})")
    serve.add_argument("--no-cobatch", action="store_true",
                       help="run every job alone, in its own forward (co-batching off); results are the same "
                       "either way")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="interlace", description="Interlace: trace and edit PyTorch models.")
    parser.add_argument("--version", action="version", version=f"interlace {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    data_help = "server data directory (default: $INTERLACE_DATA_DIR or ~/.local/share/interlace)"
    store_help = ("job store: a PostgreSQL URL (postgresql://user@host:5432/db) that several API replicas "
                  "share; default: SQLite in the data directory")

    serve = sub.add_parser("serve", help="run the server (API, job store, workers) in one process")
    serve.add_argument("--model", action="append", metavar="PATH_OR_ID",
                       help="model to host (repeatable); default: the built-in demo model")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--data-dir", help=data_help)
    serve.add_argument("--insecure", action="store_true",
                       help="allow binding to a non-loopback address even when the process sandbox "
                            "(layer 3) is incomplete on this host")
    serve.add_argument("--isolation", choices=["process", "thread"], default="process",
                       help="where jobs run: 'process' (default) a confined worker process per model; "
                            "'thread' a thread of the server process (no process sandbox)")
    serve.add_argument("--result-ttl", type=float, default=24 * 3600.0, metavar="SECONDS",
                       help="how long finished results stay downloadable (default 86400)")
    serve.add_argument("--result-store", metavar="URL",
                       help="fsspec URL for results, e.g. s3://bucket/prefix (default: DATA_DIR/results)")
    serve.add_argument("--store", metavar="URL", help=store_help)
    serve.add_argument("--advertise-url", metavar="URL",
                       help="with --store: the URL at which the other replicas reach this one, to forward "
                       "local-block requests for the jobs it runs (default http://HOST:PORT)")
    serve.add_argument("--max-upload-mb", type=float, default=256.0, help="largest accepted payload (MiB)")
    _add_limit_flags(serve)
    _add_cobatch_flags(serve)
    add_ray_flags(serve)
    serve.add_argument("--sweep-interval", type=float, default=60.0, metavar="SECONDS",
                       help="how often expired results are deleted")
    serve.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--threads", type=int, default=None, metavar="N",
                       help="torch intra-op threads for CPU models (default: CPU count - 1, leaving a "
                            "core for the HTTP/WebSocket loop)")
    serve.set_defaults(func=cmd_serve)

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key (printed once)")
    create.add_argument("--name", help="the user the key belongs to (keys with one name share jobs)")
    create.add_argument("--data-dir", help=data_help)
    create.add_argument("--store", metavar="URL", help=store_help)
    listing = keys_sub.add_parser("list", help="list keys")
    listing.add_argument("--data-dir", help=data_help)
    listing.add_argument("--store", metavar="URL", help=store_help)
    revoke = keys_sub.add_parser("revoke", help="revoke a key")
    revoke.add_argument("key_id")
    revoke.add_argument("--data-dir", help=data_help)
    revoke.add_argument("--store", metavar="URL", help=store_help)
    keys.set_defaults(func=cmd_keys)

    jobs = sub.add_parser("jobs", help="your job history: every remote=True and remote='local' run")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True)
    listing = jobs_sub.add_parser("list", help="recorded jobs, newest first")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--mode", choices=["local", "server"])
    listing.add_argument("--status", help="COMPLETED, ERROR, ...")
    listing.add_argument("--server-data", metavar="DIR",
                         help="instead, list the jobs in a server's data directory (for its operator)")
    listing.add_argument("--store", metavar="URL", help="instead, list the jobs in a server's PostgreSQL job store")
    listing.add_argument("--user", help="with --server-data: only this user's jobs")
    show = jobs_sub.add_parser("show", help="one job: timeline, sizes, body, error")
    show.add_argument("id", help="a job id or a unique prefix of one")
    rerun = jobs_sub.add_parser("rerun", help="replay a job's recorded request and print its saved values")
    rerun.add_argument("id")
    rerun.add_argument("--remote", choices=["local", "server"],
                       help="where to run it (default: where it ran): 'local' simulates here, 'server' "
                            "sends it to the configured server ($INTERLACE_HOST)")
    rerun.add_argument("--model-key", help="with --remote server: the server's model to run it on")
    diff = jobs_sub.add_parser("diff", help="what differs between two jobs")
    diff.add_argument("a")
    diff.add_argument("b")
    prune = jobs_sub.add_parser("prune", help="remove old records")
    prune.add_argument("--older-than", type=float, metavar="DAYS", help="remove records older than this")
    prune.add_argument("--keep", type=int, metavar="N", help="never remove the N newest")
    jobs.set_defaults(func=cmd_jobs)

    env = sub.add_parser("env", help="show the local environment and the configured server's")
    env.add_argument("--host", help="server URL (default: $INTERLACE_HOST)")
    env.set_defaults(func=cmd_env)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
