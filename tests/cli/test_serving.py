"""``prism up``: a worker killed under it is started again and its job re-queued; a Ctrl-C (SIGINT to
the terminal's process group) gives a job past its grace back to the queue, spending no retry, and
stops the clients while Redis still runs, so nothing logs a traceback and RQ's webhook scheduler
lock is released; a service restarted at once then finishes the job and delivers a webhook retry
when it is due, not after the lock expires."""

import contextlib
import os
import re
import signal
import subprocess
from pathlib import Path

import httpx
from redis import Redis
from redis.exceptions import RedisError
from rq.scheduler import RQScheduler

from cli.local_redis import LocalRedis, free_port
from service.contract.settings import Settings
from tests.api.test_webhooks import SECRET, Receiver
from tests.stack import (
    healthy,
    poll,
    prism,
    service_env,
    start_worker,
    stop,
    submit,
    wait_for,
    wait_ready,
    wait_running,
)

LOCK = RQScheduler.get_locking_key(Settings().webhook_queue_name)


def _up(env: dict[str, str], port: int, log: Path) -> tuple[subprocess.Popen, str]:
    """``prism up`` in its own process group, as a terminal runs it; returns it and its Redis URL."""
    process = subprocess.Popen(
        prism("up", "--port", str(port)), env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: healthy(url), bool, "the API")
        wait_ready(url)
        redis_url = _redis_urls(log)[-1]
        wait_for(lambda: Redis.from_url(redis_url).exists(LOCK), bool, "the webhook scheduler's lock")
    except BaseException:
        _kill(process, log)
        raise
    return process, url


def _redis_urls(log: Path) -> list[str]:
    """The Redis URLs the ``prism up`` runs logging to ``log`` started, oldest first."""
    return re.findall(r"started redis-server at (\S+)", log.read_text())


def _kill(process: subprocess.Popen, log: Path) -> None:
    """Nothing of a ``prism up`` outlives a failed test: its group, then its Redis (a session of its own)."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    for url in _redis_urls(log):
        with contextlib.suppress(RedisError):
            Redis.from_url(url, socket_timeout=2).shutdown(nosave=True)


def _children(parent: int) -> list[int]:
    """The pids whose parent is ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _ctrl_c(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(300) == 0  # a grace of 2 s, then every process stopped in turn: long on busy cores


def test_a_killed_worker_restarts_and_ctrl_c_gives_jobs_back_and_stops_redis_last(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    env = service_env("", tiny_model_dir, PRISM_HOME=str(home), PRISM_WEBHOOK_ALLOW_PRIVATE="true",
                      PRISM_WEBHOOK_SECRET=SECRET, PRISM_WEBHOOK_RETRY_FIRST_S="3", PRISM_STOP_GRACE_S="2")  # fmt: skip
    del env["PRISM_REDIS_URL"]
    log = tmp_path / "up.log"
    first, url = _up(env, free_port(), log)
    try:
        killed = submit(url, steps="12").json()["id"]
        wait_running(url, killed)
        (worker,) = [pid for pid in _children(first.pid) if _cmdline(pid).endswith(" worker")]
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: log.read_text(), lambda text: "worker 0 exited (code -9)" in text, "the restart line")
        final = poll(url, killed, {"succeeded", "failed"})
        assert final["status"] == "succeeded" and final["requeues"] == 1
        held = submit(url, steps="60").json()["id"]
        wait_running(url, held)
        _ctrl_c(first)
    finally:
        if first.poll() is None:
            _kill(first, log)
    text = log.read_text()
    assert "Traceback" not in text and "ConnectionError" not in text, text[-3000:]
    assert "back on the queue for the next worker" in text
    with LocalRedis(home / "redis") as stopped:  # the same AOF, read back
        redis = Redis.from_url(stopped.url)
        assert not redis.exists(LOCK)
        # every worker that was stopped unregistered (the killed one could not: its key expires)
        assert [w for w in redis.smembers("rq:workers") if f".{worker}.".encode() not in w] == []
        assert redis.lindex("rq:queue:prism", 0) == held.encode()  # given back, first in line

    receiver = Receiver(fail=1)
    second, url = _up(env, free_port(), log)
    try:
        assert wait_running(url, held)["requeues"] == 0  # taken again first, and the stop spent no retry
        assert httpx.post(f"{url}/jobs/{held}/cancel", timeout=60).status_code in (200, 202)  # its run is not the point
        job_id = submit(url, webhook=receiver.url, steps="2").json()["id"]
        assert poll(url, job_id, {"succeeded", "failed"})["status"] == "succeeded"
        wait_for(lambda: len(receiver.requests), lambda n: n >= 4, "each event delivered on its retry")
    finally:
        receiver.close()
        _ctrl_c(second)
    tries = [int(headers["webhook-timestamp"]) for headers, body in receiver.requests if b"job.started" in body]
    # the retry is due 3 s after the first try; a lock left behind would hold it for a minute or more
    assert len(tries) == 2 and tries[1] - tries[0] < 60, tries


def _probe(env: dict[str, str]) -> int:
    return subprocess.run(prism("worker-probe"), env=env, capture_output=True).returncode


def test_worker_probe_follows_the_heartbeat_that_reached_redis(tmp_path, tiny_model_dir):
    """What the Kubernetes readiness probe runs: ready while the worker beats into Redis, not
    before it has, and not once Redis stops taking the beats."""
    server = LocalRedis().start()
    env = service_env(server.url, tiny_model_dir, PRISM_WORKER_HEARTBEAT_FILE=str(tmp_path / "beat"))
    assert _probe(env) == 1  # no worker yet
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        wait_for(lambda: _probe(env), lambda rc: rc == 0, "a ready worker")
        server.stop()
        wait_for(lambda: _probe(env), lambda rc: rc == 1, "the probe failing while Redis is gone")
    finally:
        stop(worker)
        server.close()
