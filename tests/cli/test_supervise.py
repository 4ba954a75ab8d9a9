"""Processes that stay up (``cli.supervise``): ``prism worker --devices`` pins one worker per GPU, or
per share of the cores, and starts a worker that exits again. (``prism up``'s restarts and stop are
tests/cli/test_serving.py's.)"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from cli.local_redis import free_port
from cli.supervise import core_shares
from tests.cli.test_serving import _children, _cmdline
from tests.stack import prism, service_env, wait_for


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = (Path("/proc") / str(pid) / "environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _cpus(pid: int) -> str:
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    return ""


def _workers(parent: int) -> list[int]:
    return [pid for pid in _children(parent) if _cmdline(pid).endswith(" worker")]


def test_devices_pin_one_worker_per_gpu_and_split_the_cores_on_the_cpu(tmp_path, tiny_model_dir):
    """No GPU here: the GPU workers are seen pinned while they start (they then fail to find
    CUDA and are started again, as a worker that exits is); the CPU workers run."""
    env = service_env(f"redis://127.0.0.1:{free_port()}/0", tiny_model_dir)
    env["PRISM_WORKER_HEARTBEAT_FILE"] = str(tmp_path / "beat")
    env.pop("PRISM_DEVICE")
    log = tmp_path / "gpus.log"
    gpus = subprocess.Popen(
        prism("worker", "--devices", "0,1,3"), env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT
    )
    try:
        seen: dict[str, dict[str, str]] = {}

        def pinned() -> int:
            for pid in _workers(gpus.pid):
                child = _environ(pid)
                if child.get("CUDA_VISIBLE_DEVICES"):
                    seen[child["CUDA_VISIBLE_DEVICES"]] = child
            return len(seen)

        wait_for(pinned, lambda n: n == 3, "three workers, one per GPU")
        assert {d: (c["PRISM_DEVICE"], c["PRISM_WORKER_HEARTBEAT_FILE"]) for d, c in seen.items()} == {
            d: ("cuda", f"{tmp_path / 'beat'}.{d}") for d in ("0", "1", "3")
        }
        wait_for(lambda: log.read_text(), lambda text: "starting it again" in text, "a restart line")
    finally:
        gpus.send_signal(signal.SIGTERM)
        assert gpus.wait(120) == 0

    env["PRISM_DEVICE"] = "cpu"
    cpus = subprocess.Popen(prism("worker", "--devices", "0,1"), env=env, stdout=(tmp_path / "cpus.log").open("ab"),
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        expected = core_shares(2, sorted(os.sched_getaffinity(0)))
        wait_for(lambda: len(_workers(cpus.pid)), lambda n: n == 2, "two CPU workers")
        shares = sorted((_cpus(pid), _environ(pid)["PRISM_CPU_THREADS"]) for pid in _workers(cpus.pid))
        assert shares == sorted((_list(share), str(len(share))) for share in expected)
    finally:
        cpus.send_signal(signal.SIGTERM)
        assert cpus.wait(120) == 0


def _list(cores: frozenset[int]) -> str:
    """Cores as the kernel lists them (``0-3`` or ``5``)."""
    low, high = min(cores), max(cores)
    return str(low) if low == high else f"{low}-{high}"


def test_core_shares_are_even_and_cover_every_core():
    assert core_shares(2, [0, 1]) == [frozenset({0}), frozenset({1})]
    assert core_shares(3, list(range(8))) == [frozenset({0, 1, 2}), frozenset({3, 4, 5}), frozenset({6, 7})]
    assert core_shares(4, [0, 1]) == [frozenset({0}), frozenset({1})]  # never an empty share
