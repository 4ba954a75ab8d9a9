"""Child processes that stay up: ``prism up`` (workers, the webhook sender, the API) and
``prism worker --devices`` (one model-holding worker per GPU, or per share of the cores).

A child that exits unexpectedly is started again after a pause that doubles with each quick exit
(1 s up to a minute), with one log line each time, as Compose's ``restart:`` and Kubernetes do.
Stopping signals every child once (workers finish or give back their jobs within their grace),
waits, and kills what is left; a second Ctrl-C passes on at once (workers give their jobs back
now).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("prism.supervise")
FIRST_PAUSE_S = 1.0
MAX_PAUSE_S = 60.0
STEADY_S = 60.0
"""A child that ran this long before exiting starts again after the first pause, not a longer one."""


@dataclass
class Child:
    """One supervised command, its environment and its current process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cpus: frozenset[int] | None = None
    """The cores it may run on (None: any)."""
    process: subprocess.Popen | None = None
    started: float = 0.0
    pause: float = FIRST_PAUSE_S
    due: float = 0.0
    restarts: int = 0

    def start(self) -> None:
        cpus = self.cpus
        preexec: Callable[[], None] | None = None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))
        self.process = subprocess.Popen(self.argv, env=self.env, preexec_fn=preexec)  # noqa: PLW1509
        self.started = time.monotonic()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Supervisor:
    """Keeps ``children`` running until :meth:`stop`."""

    def __init__(self, children: list[Child]) -> None:
        self.children = children
        self.stopping = False

    def start(self) -> None:
        for child in self.children:
            child.start()

    def tend(self) -> None:
        """Start again each child that exited while no stop was asked, once its pause is over."""
        now = time.monotonic()
        for child in self.children:
            if self.stopping or child.running:
                continue
            if child.due == 0.0:
                code = child.process.returncode if child.process else None
                child.pause = FIRST_PAUSE_S if now - child.started > STEADY_S else child.pause
                child.due = now + child.pause
                log.warning("%s exited (code %s); starting it again in %.0f s", child.name, code, child.pause)
            elif now >= child.due:
                child.restarts += 1
                child.due = 0.0
                child.pause = min(child.pause * 2, MAX_PAUSE_S)
                child.start()

    def signal(self, signum: int, names: Callable[[Child], bool] = lambda _: True) -> None:
        for child in self.children:
            if child.running and names(child):
                child.process.send_signal(signum)

    def stop(self, grace_s: float, order: list[Callable[[Child], bool]] | None = None) -> None:
        """SIGTERM the children (group by group, each waited for, in ``order``), kill what is left
        after ``grace_s`` in all; a second Ctrl-C meanwhile passes SIGINT on at once."""
        self.stopping = True
        deadline = time.monotonic() + grace_s
        forced = False

        def force(*_) -> None:
            nonlocal forced
            if not forced:
                forced = True
                log.warning("second Ctrl-C: the workers give their jobs back to the queue now")
                self.signal(signal.SIGINT)

        previous = signal.signal(signal.SIGINT, force)
        try:
            for group in order or [lambda _: True]:
                self.signal(signal.SIGTERM, group)
                for child in self.children:
                    if child.process is not None and group(child):
                        try:
                            child.process.wait(max(0.0, deadline - time.monotonic()))
                        except subprocess.TimeoutExpired:
                            continue
        finally:
            for child in self.children:
                if child.running:
                    log.warning("%s did not stop in time; killing it", child.name)
                    child.process.kill()
                    child.process.wait()
            signal.signal(signal.SIGINT, previous)


def gpu_indices() -> list[str]:
    """The GPUs this host's driver lists (``nvidia-smi``), or those ``CUDA_VISIBLE_DEVICES`` names."""
    if visible := os.environ.get("CUDA_VISIBLE_DEVICES"):
        return [part.strip() for part in visible.split(",") if part.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    listed = subprocess.run(
        ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, check=False
    )
    return [line.strip() for line in listed.stdout.splitlines() if line.strip()] if listed.returncode == 0 else []


def core_shares(count: int, cores: list[int]) -> list[frozenset[int]]:
    """``cores`` split into ``count`` contiguous shares, as even as they go (at least one core each)."""
    count = max(1, min(count, len(cores)))
    size, extra = divmod(len(cores), count)
    shares, start = [], 0
    for index in range(count):
        end = start + size + (1 if index < extra else 0)
        shares.append(frozenset(cores[start:end]))
        start = end
    return shares


def device_workers(devices: list[str], cpu: bool, argv: list[str], env: dict[str, str]) -> list[Child]:
    """One worker per device: on GPUs each sees only its own (``CUDA_VISIBLE_DEVICES``); on the CPU
    (``cpu``) ``devices`` name shares of the cores, each worker pinned to its share with as many
    threads. Each has its own heartbeat file when one is set."""
    children = []
    shares = core_shares(len(devices), sorted(os.sched_getaffinity(0))) if cpu else []
    for index, device in enumerate(devices):
        child_env = dict(env)
        cpus = None
        if cpu:
            cpus = shares[index % len(shares)]
            child_env.update(PRISM_DEVICE="cpu", PRISM_CPU_THREADS=str(len(cpus)))
        else:
            child_env.update(CUDA_VISIBLE_DEVICES=device, PRISM_DEVICE="cuda")
        if beat := env.get("PRISM_WORKER_HEARTBEAT_FILE"):
            child_env["PRISM_WORKER_HEARTBEAT_FILE"] = f"{beat}.{device}"
        children.append(Child(f"worker {device}", argv, child_env, cpus))
    return children
