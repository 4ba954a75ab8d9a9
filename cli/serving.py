"""``prism serve`` (the API), ``prism worker`` (one worker) and ``prism up`` (Redis, workers, API)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cli.errors import CliError
from cli.options import port, positive

BATCH_HELP = "jobs a worker runs as one batch (PRISM_WORKER_BATCH; default 1): see the README on sizing it"


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the HTTP API (uvicorn)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=port, default=8000)
    serve.set_defaults(func=run_api, log_level=logging.INFO)

    worker = sub.add_parser("worker", help="run a worker: load the model once, then serve jobs")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.add_argument("--batch", type=positive(int), help=BATCH_HELP)
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
    up.add_argument("--batch", type=positive(int), help=BATCH_HELP)
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
    if args.batch is not None:
        try:
            settings = type(settings)(**{**settings.model_dump(), "worker_batch": args.batch})
        except ValidationError as exc:
            raise CliError("--batch", exc.errors()[0]["msg"]) from None
    try:
        locate_model(settings.model_dir, settings.clip_model)
        from worker.main import run_worker as serve_jobs  # torch and diffusers: once the files are known there

        serve_jobs(settings, burst=args.burst)
    except ModelLoadError as exc:
        raise CliError(None, str(exc)) from exc
    return 0


def probe_worker(args: argparse.Namespace) -> int:
    """A readiness/liveness exec probe: the worker touches the file at each heartbeat Redis took,
    so a stale file means the worker is stuck, gone or cut off from Redis."""
    from service.contract.settings import get_settings

    settings = get_settings()
    if not settings.worker_heartbeat_file:
        raise CliError("PRISM_WORKER_HEARTBEAT_FILE", "is not set, so there is no heartbeat to probe")
    limit = 3 * settings.worker_heartbeat_s
    try:
        age = time.time() - Path(settings.worker_heartbeat_file).stat().st_mtime
    except FileNotFoundError:
        print(f"no heartbeat yet at {settings.worker_heartbeat_file}", file=sys.stderr)
        return 1
    if age > limit:
        print(f"last heartbeat {age:.0f} s ago (limit {limit} s)", file=sys.stderr)
        return 1
    return 0


def run_webhooks(args: argparse.Namespace) -> int:
    from service.contract.settings import get_settings
    from worker.webhooks import run_webhook_worker

    run_webhook_worker(get_settings(), burst=args.burst)
    return 0


def run_all(args: argparse.Namespace) -> int:
    """Redis (unless PRISM_REDIS_URL is set), N workers and the API; all stopped on exit."""
    from cli.local_redis import LocalRedis
    from service.contract.settings import get_settings

    env = dict(os.environ)
    local = None
    if not env.get("PRISM_REDIS_URL"):
        local = LocalRedis(Path(get_settings().home).expanduser() / "redis").start()
        env["PRISM_REDIS_URL"] = local.url
        print(f"started redis-server at {local.url}", file=sys.stderr)
    if args.batch is not None:
        env["PRISM_WORKER_BATCH"] = str(args.batch)
    if not env.get("PRISM_CPU_THREADS"):
        env["PRISM_CPU_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.workers))
    prism = [sys.executable, "-m", "cli"]
    children = [subprocess.Popen([*prism, "worker"], env=env) for _ in range(args.workers)]
    children.append(subprocess.Popen([*prism, "webhook-worker"], env=env))
    api = subprocess.Popen([*prism, "serve", "--host", args.host, "--port", str(args.port)], env=env)
    children.append(api)
    print(f"PRISM API docs: http://{args.host}:{args.port}/docs", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: api.terminate())
    try:
        api.wait()
    except KeyboardInterrupt:
        pass
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
        if local:
            local.stop()
    return 0
