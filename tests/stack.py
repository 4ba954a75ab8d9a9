"""Real processes for service tests: a redis-server, prism workers and a uvicorn API.

Waits are on states, not on wall-clock budgets: a wait fails only when nothing has changed for
``STALL_S`` seconds, so the suite passes on a machine whose cores are busy with other work.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import httpx

from cli.local_redis import LocalRedis, free_port
from tests.helpers import EDIT, SOURCE, png_bytes, xray_like

STALL_S = 300.0
T = TypeVar("T")


def wait_for(
    observe: Callable[[], T], done: Callable[[T], bool], what: str, stall_s: float = STALL_S, every_s: float = 0.1
) -> T:
    """Poll ``observe`` every ``every_s`` until ``done``; fail if the observation stops changing for ``stall_s``."""
    last, changed = object(), time.monotonic()
    while True:
        value = observe()
        if done(value):
            return value
        if value != last:
            last, changed = value, time.monotonic()
        elif time.monotonic() - changed > stall_s:
            raise TimeoutError(f"{what}: no change for {stall_s:.0f} s (last: {value!r})")
        time.sleep(every_s)


def service_env(redis_url: str, model_dir: Path, **extra: str) -> dict[str, str]:
    """The settings of a test stack: its Redis, its model, a blob store of its own (a fresh
    directory unless ``PRISM_BLOB_URL`` is given), one CPU thread per process."""
    env = dict(os.environ)
    env.update(
        PRISM_REDIS_URL=redis_url,
        PRISM_BLOB_URL=Path(tempfile.mkdtemp(prefix="prism-blobs-")).as_uri(),
        PRISM_MODEL_DIR=str(model_dir),
        PRISM_DEVICE="cpu",
        PRISM_WORKER_HEARTBEAT_S="1",
        PRISM_AUTH="off",
        PRISM_INVERSION_CACHE_DIR="",
        PRISM_CPU_THREADS="1",  # the test, the API and the workers share two cores
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def prism(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


def start_worker(env: dict[str, str], log: Path, command: str = "worker") -> subprocess.Popen:
    return subprocess.Popen(prism(command), env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


class ApiProcess:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            prism("serve", "--port", str(self.port)), env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT
        )

        def started() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"the API exited with {self.process.returncode}; see {log}")
            return healthy(self.url)

        wait_for(started, bool, "API start")

    def stop(self) -> None:
        stop(self.process)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def ready_workers(url: str) -> int:
    r = httpx.get(f"{url}/readyz", timeout=30)
    return r.json()["workers"] if r.status_code == 200 else 0


def wait_ready(url: str, workers: int = 1) -> None:
    wait_for(lambda: ready_workers(url), lambda n: n >= workers, f"{workers} worker(s) ready")


def job_state(url: str, job_id: str, headers: dict | None = None) -> dict:
    return httpx.get(f"{url}/jobs/{job_id}", headers=headers or {}, timeout=30).json()


def poll(url: str, job_id: str, until: set[str], headers: dict | None = None) -> dict:
    """The job's status once it is in ``until``; fails if its status and progress stop changing."""
    body: dict = {}

    def snapshot() -> tuple:
        nonlocal body
        body = job_state(url, job_id, headers)
        return body["status"], body["progress"]["phase"], body["progress"]["step"], body.get("requeues")

    wait_for(snapshot, lambda s: s[0] in until, f"job {job_id}")
    return body


class Cluster:
    """A private redis-server, ``workers`` worker processes and an API, with extra settings."""

    def __init__(
        self, tmp: Path, model_dir: Path, workers: int = 1, webhook_sender: bool = False, **settings: str
    ) -> None:
        self.tmp = tmp
        self.redis = LocalRedis(tmp / "redis-data").start()
        self.env = service_env(self.redis.url, model_dir, **settings)
        self.workers = [self.add_worker() for _ in range(workers)]
        if webhook_sender:
            self.workers.append(start_worker(self.env, tmp / "webhooks.log", "webhook-worker"))
        self.api = ApiProcess(self.env, tmp / "api.log")
        self.url = self.api.url
        if workers:
            wait_ready(self.url, workers)

    def add_worker(self) -> subprocess.Popen:
        n = len(list(self.tmp.glob("worker*.log")))
        return start_worker(self.env, self.tmp / f"worker{n}.log")

    @property
    def blobs(self) -> Path:
        """The directory of the stack's blob store."""
        return blob_dir(self.env)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.tmp.glob("*.log")))

    def close(self) -> None:
        self.api.stop()
        for w in self.workers:
            stop(w)
        self.redis.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def blob_dir(env: dict[str, str]) -> Path:
    """The directory of a stack's blob store (its ``PRISM_BLOB_URL`` is a file:// URL)."""
    return Path(urlsplit(env["PRISM_BLOB_URL"]).path)


def submit(url: str, image: bytes | None = None, headers: dict | None = None, **fields) -> httpx.Response:
    """POST /counterfactual with the usual prompts, 3 steps and one sweep value unless overridden."""
    data = {"original_prompt": SOURCE, "edit_prompt": EDIT, "steps": "3", "self_replace_steps": "0.5", **fields}
    files = {"image": ("scan.png", png_bytes(xray_like(64, 64)) if image is None else image, "image/png")}
    return httpx.post(f"{url}/counterfactual", files=files, data=data, headers=headers or {}, timeout=60)


def wait_running(url: str, job_id: str, headers: dict | None = None) -> dict:
    """The job's status once a worker is inside its null-text or editing loop."""

    def running(body: dict) -> bool:
        return body["status"] == "running" and body["progress"]["phase"] in ("null_text", "editing")

    return wait_for(lambda: job_state(url, job_id, headers), running, f"job {job_id} running")
