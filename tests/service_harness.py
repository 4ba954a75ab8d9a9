"""Real processes for service tests: a redis-server, prism workers and a uvicorn API."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.redis_server import free_port


def service_env(redis_url: str, model_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PRISM_REDIS_URL=redis_url,
        PRISM_MODEL_DIR=str(model_dir),
        PRISM_DEVICE="cpu",
        PRISM_WORKER_HEARTBEAT_S="1",
        PRISM_AUTH="off",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker"], env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT
    )


class ApiProcess:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)],
            env=env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("API did not start")

    def stop(self) -> None:
        stop(self.process)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_ready(url: str, workers: int = 1, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/readyz", timeout=5)
        if r.status_code == 200 and r.json()["workers"] >= workers:
            return
        time.sleep(0.2)
    raise RuntimeError("no worker became ready")


def poll(url: str, job_id: str, until: set[str], timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = httpx.get(f"{url}/jobs/{job_id}", timeout=5).json()
        if body["status"] in until:
            return body
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} still {body['status']}")


class Cluster:
    """A private redis-server, ``workers`` worker processes and an API, with extra settings."""

    def __init__(self, tmp: Path, model_dir: Path, workers: int = 1, **settings: str) -> None:
        from service.redis_server import LocalRedis

        self.tmp = tmp
        self.redis = LocalRedis(tmp / "redis-data").start()
        self.env = service_env(self.redis.url, model_dir, **settings)
        self.workers = [self.add_worker() for _ in range(workers)]
        self.api = ApiProcess(self.env, tmp / "api.log")
        self.url = self.api.url
        if workers:
            wait_ready(self.url, workers)

    def add_worker(self) -> subprocess.Popen:
        n = len(list(self.tmp.glob("worker*.log")))
        return start_worker(self.env, self.tmp / f"worker{n}.log")

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
