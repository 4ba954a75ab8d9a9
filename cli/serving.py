"""``prism serve`` (the API), ``prism worker`` (one worker) and ``prism up`` (Redis, workers, API)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from cli.errors import CliError
from cli.options import port, positive

PACK_HELP = "jobs a worker runs as one pack (PRISM_WORKER_PACK; default 1): see the README on sizing it"
DEVICES_HELP = (
    "one worker per device, each pinned to it and started again if it exits: 'all' or GPU indices such as "
    "0,1,3; with PRISM_DEVICE=cpu the indices name shares of the cores, each worker pinned to its share"
)
STOP_MARGIN_S = 30
"""What a stop waits beyond PRISM_STOP_GRACE_S: a worker's last steps and its goodbye to Redis."""


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the HTTP API (uvicorn)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=port, default=8000)
    serve.set_defaults(func=run_api, log_level=logging.INFO)

    worker = sub.add_parser("worker", help="run a worker: load the model once, then serve jobs")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.add_argument("--pack", type=positive(int), help=PACK_HELP)
    worker.add_argument("--devices", help=DEVICES_HELP)
    worker.set_defaults(func=run_worker, log_level=logging.INFO)

    probe = sub.add_parser(
        "worker-probe", help="exit 0 if this host's worker beat within 3 heartbeats (PRISM_WORKER_HEARTBEAT_FILE)"
    )
    probe.set_defaults(func=probe_worker)

    hooks = sub.add_parser("webhook-worker", help="deliver webhooks (its own process: receivers never hold a GPU)")
    hooks.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    hooks.set_defaults(func=run_webhooks, log_level=logging.INFO)

    up = sub.add_parser("up", help="start redis (if PRISM_REDIS_URL is unset), workers, the webhook sender and the API")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=port, default=8000)
    up.add_argument("--workers", type=positive(int), default=1, help="GPU workers, each holding the model once")
    up.add_argument("--pack", type=positive(int), help=PACK_HELP)
    up.add_argument("--devices", help=DEVICES_HELP + " (instead of --workers)")
    up.set_defaults(func=run_all, log_level=logging.INFO)


def run_api(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api.app import create_app

    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="info", log_config=None)
    return 0


def run_worker(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from models.request.errors import ModelLoadError
    from models.weights.layout import locate_model
    from service.contract.settings import get_settings

    settings = get_settings()
    if args.pack is not None:
        try:
            settings = type(settings)(**{**settings.model_dump(), "worker_pack": args.pack})
        except ValidationError as exc:
            raise CliError("--pack", exc.errors()[0]["msg"]) from None
    try:
        locate_model(settings.model_dir, settings.clip_model)
    except ModelLoadError as exc:
        raise CliError(None, str(exc)) from exc
    if args.devices is not None:
        return _per_device(args, settings)
    from worker.main import run_worker as serve_jobs  # torch and diffusers: once the files are known there

    try:
        serve_jobs(settings, burst=args.burst)
    except ModelLoadError as exc:
        raise CliError(None, str(exc)) from exc
    return 0


def _devices(text: str, cpu: bool) -> list[str]:
    """``--devices``: ``all`` (every GPU; on the CPU, one worker on every core) or indices ``0,1,3``."""
    if text == "all":
        if cpu:
            return ["0"]
        from cli.supervise import gpu_indices

        found = gpu_indices()
        if not found:
            raise CliError("--devices", "all: no GPU found (nvidia-smi lists none); on the CPU set PRISM_DEVICE=cpu")
        return found
    devices = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in devices) or len(set(devices)) != len(devices):
        raise CliError("--devices", f"must be 'all' or distinct device indices such as 0,1,3, got {text!r}")
    return devices


def _per_device(args: argparse.Namespace, settings) -> int:
    """One supervised ``prism worker`` per device; SIGTERM or Ctrl-C stops them as one."""
    from cli.supervise import Supervisor, device_workers

    cpu = settings.device == "cpu"
    argv = [sys.executable, "-m", "cli", "worker", *(["--burst"] if args.burst else [])]
    env = dict(os.environ)
    if args.pack is not None:
        env["PRISM_WORKER_PACK"] = str(args.pack)
    _supervise(Supervisor(device_workers(_devices(args.devices, cpu), cpu, argv, env)), settings.stop_grace_s)
    return 0


def _supervise(supervisor, grace_s: int, order=None) -> None:
    """Start and tend ``supervisor``'s children until SIGTERM or Ctrl-C, then stop them (in ``order``)."""
    stop = []
    handler = signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    supervisor.start()
    try:
        while not stop:
            supervisor.tend()
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, handler)
        supervisor.stop(grace_s + STOP_MARGIN_S, order)


def probe_worker(args: argparse.Namespace) -> int:
    """A readiness/liveness exec probe: the worker touches the file at each heartbeat Redis took,
    so a stale file means the worker is stuck, gone or cut off from Redis. Under ``--devices``
    each worker has its own (``FILE.<device>``): every one must be fresh."""
    from service.contract.settings import get_settings

    settings = get_settings()
    if not settings.worker_heartbeat_file:
        raise CliError("PRISM_WORKER_HEARTBEAT_FILE", "is not set, so there is no heartbeat to probe")
    limit = 3 * settings.worker_heartbeat_s
    beat = Path(settings.worker_heartbeat_file)
    files = [beat] if beat.exists() else sorted(beat.parent.glob(f"{beat.name}.*"))
    if not files:
        print(f"no heartbeat yet at {beat}", file=sys.stderr)
        return 1
    for path in files:
        age = time.time() - path.stat().st_mtime
        if age > limit:
            print(f"last heartbeat at {path.name} {age:.0f} s ago (limit {limit} s)", file=sys.stderr)
            return 1
    return 0


def run_webhooks(args: argparse.Namespace) -> int:
    from service.contract.settings import get_settings
    from worker.webhooks import run_webhook_worker

    run_webhook_worker(get_settings(), burst=args.burst)
    return 0


def run_all(args: argparse.Namespace) -> int:
    """Redis (unless PRISM_REDIS_URL is set), the workers, the webhook sender and the API, each
    started again if it exits; Ctrl-C stops the workers first (their jobs finish or go back to the
    queue within PRISM_STOP_GRACE_S), then the webhook sender and the API, and Redis last."""
    from cli.local_redis import LocalRedis
    from cli.supervise import Child, Supervisor, device_workers
    from service.contract.settings import get_settings

    settings = get_settings()
    env = dict(os.environ)
    local = None
    if not env.get("PRISM_REDIS_URL"):
        local = LocalRedis(Path(settings.home).expanduser() / "redis").start()
        env["PRISM_REDIS_URL"] = local.url
        print(f"started redis-server at {local.url}", file=sys.stderr)
    if args.pack is not None:
        env["PRISM_WORKER_PACK"] = str(args.pack)
    prism = [sys.executable, "-m", "cli"]
    if args.devices is not None:
        cpu = settings.device == "cpu"
        workers = device_workers(_devices(args.devices, cpu), cpu, [*prism, "worker"], env)
    else:
        if not env.get("PRISM_CPU_THREADS"):
            env["PRISM_CPU_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.workers))
        workers = [Child(f"worker {n}", [*prism, "worker"], env) for n in range(args.workers)]
    webhooks = Child("webhook sender", [*prism, "webhook-worker"], env)
    api = Child("API", [*prism, "serve", "--host", args.host, "--port", str(args.port)], env)
    supervisor = Supervisor([*workers, webhooks, api])
    print(f"PRISM API docs: http://{args.host}:{args.port}/docs", file=sys.stderr, flush=True)
    try:
        _supervise(supervisor, settings.stop_grace_s, order=[lambda c: c in workers, lambda c: c not in workers])
    finally:
        if local:
            local.stop()
    return 0
