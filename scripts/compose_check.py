"""Build both images and run the Compose stack end to end on this machine, then write what happened
to docs/deploy/compose-check.md. Run by scripts/compose-check.sh (root: it starts its own dockerd).

No registry is reachable here, so base images are made with debootstrap and ``docker import``;
every container uses host networking (dockerd runs with ``--bridge=none --iptables=false``), so
all traffic stays on loopback. The real ``docker-compose.yml`` runs, with ``docker/compose.check.yml``
over it (host networking, local images, the built-in model on the CPU). Checked: the README's curl
example succeeds in containers; a worker container killed mid-job has its job re-queued and
finished by the next worker; jobs queued across a Redis restart survive (AOF).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
REDIS_PORT, API_PORT = 16379, 18000
BASE_PATH = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROJECT = "prismcheck"
PROMPTS = {
    "original_prompt": "chest x-ray of a patient with support devices",
    "edit_prompt": "chest x-ray of a patient without support devices",
}


class Check:
    """The run's log: each step's command, time and outcome, written as Markdown at the end."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.rows: list[tuple[str, float, str]] = []
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{work}/docker/docker.sock",
            "PRISM_CHECK_REDIS_PORT": str(REDIS_PORT),
            "PRISM_CHECK_API_PORT": str(API_PORT),
            "PRISM_MODELS": str(work / "weights"),
            "COMPOSE_PROJECT_NAME": PROJECT,
        }

    def step(self, what: str, action: Callable[[], str]) -> str:
        print(f"== {what}", flush=True)
        start = time.monotonic()
        outcome = action()
        self.rows.append((what, time.monotonic() - start, outcome))
        print(f"   {outcome} ({time.monotonic() - start:.0f} s)", flush=True)
        return outcome

    def run(self, *args: str, capture: bool = False, check: bool = True) -> str:
        result = subprocess.run(
            args, env=self.env, cwd=ROOT, text=True, check=check, stdout=subprocess.PIPE if capture else None
        )
        return result.stdout or ""

    def compose(self, *args: str, capture: bool = False) -> str:
        return self.run("docker-compose", "-f", str(self.work / "compose.yml"), *args, capture=capture)


def start_dockerd(check: Check) -> subprocess.Popen:
    docker = check.work / "docker"
    docker.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["docker", "info"], env=check.env, capture_output=True).returncode == 0:
        raise SystemExit(f"a dockerd already serves {docker}: stop it first (its pid is in {docker}/dockerd.pid)")
    daemon = subprocess.Popen(
        ["dockerd", "--bridge=none", "--iptables=false", "--ip-masq=false", f"--data-root={docker}/data",
         f"--exec-root={docker}/exec", f"--host=unix://{docker}/docker.sock", f"--pidfile={docker}/dockerd.pid"],
        stdout=(docker / "dockerd.log").open("ab"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    for _ in range(120):
        if daemon.poll() is not None:
            break
        if subprocess.run(["docker", "info"], env=check.env, capture_output=True).returncode == 0:
            return daemon
        time.sleep(0.5)
    daemon.terminate()
    raise SystemExit("dockerd did not start; see " + str(docker / "dockerd.log"))


def base_images(check: Check) -> str:
    """Debian bookworm by debootstrap, with Python 3.11 in /opt/venv on PATH (what python:3.11-slim
    offers the API image) and redis-server (for the Redis service). This machine's extra CA
    certificates (its egress proxy's) go in too, so pip and apt inside the builds reach the registries."""
    rootfs = check.work / "rootfs"
    if not (rootfs / "usr" / "bin" / "redis-server").exists():
        shutil.rmtree(rootfs, ignore_errors=True)
        packages = "python3,python3-venv,python3-pip,ca-certificates,redis-server"
        check.run("debootstrap", "--variant=minbase", f"--include={packages}", "bookworm", str(rootfs),
                  "http://deb.debian.org/debian")  # fmt: skip
    for certificate in Path("/usr/local/share/ca-certificates").glob("*.crt"):
        shutil.copy(certificate, rootfs / "usr" / "local" / "share" / "ca-certificates" / certificate.name)
    check.run("chroot", str(rootfs), "update-ca-certificates")
    if not (rootfs / "opt" / "venv" / "bin" / "pip").exists():
        check.run("chroot", str(rootfs), "python3", "-m", "venv", "/opt/venv")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(
        ["docker", "import", "--change", f"ENV PATH={BASE_PATH}",
         "--change", "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt", "-", "prism-check/python"],
        stdin=tar.stdout, env=check.env, check=True, capture_output=True,
    )  # fmt: skip
    tar.wait()
    redis = "FROM prism-check/python\nRUN mkdir -p /data && chown redis:redis /data\nUSER redis\nWORKDIR /data\n"
    subprocess.run(["docker", "build", "-q", "-t", "prism-check/redis", "-"], input=redis, text=True,
                   env=check.env, check=True, capture_output=True)  # fmt: skip
    return "prism-check/python and prism-check/redis imported"


def compose_file(check: Check) -> str:
    """The merged Compose file, less the two keys Compose v1 (Debian bookworm's) cannot remove in an
    override: the worker's GPU reservation (no GPU here) and the API's published port (refused with
    host networking, where the API listens on the host's loopback itself)."""
    merged = yaml.safe_load(
        check.run(
            "docker-compose", "-f", "docker-compose.yml", "-f", "docker/compose.check.yml", "config", capture=True
        )
    )
    del merged["services"]["worker"]["deploy"]
    del merged["services"]["api"]["ports"]
    (check.work / "weights").mkdir(exist_ok=True)
    (check.work / "compose.yml").write_text(yaml.safe_dump(merged, sort_keys=False))
    return "docker-compose.yml + docker/compose.check.yml, less the GPU reservation and the published port"


def build(check: Check) -> str:
    wheels = ROOT / "docker" / "wheels"
    for wheel in Path("/opt/wheels").glob("torch-2.13.0+cpu-*.whl"):
        shutil.copy(wheel, wheels / wheel.name)
    check.run("docker", "build", "--network=host", "--build-arg", "BASE=prism-check/python", "-t", "prism-api:check",
              "-f", "docker/api.Dockerfile", ".")  # fmt: skip
    check.run("docker", "build", "--network=host", "--build-arg", "BASE=prism-check/python", "-t", "prism-worker:check",
              "-f", "docker/worker.Dockerfile", ".")  # fmt: skip
    sizes = check.run("docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}} {{.Size}}", capture=True)
    return "; ".join(line for line in sizes.splitlines() if ":check" in line)


def api_has_no_torch(check: Check) -> str:
    out = check.run("docker", "run", "--rm", "--network=host", "prism-api:check", "python", "-c",
                    "import importlib.util as u; print(u.find_spec('torch') is None)", capture=True)  # fmt: skip
    assert out.strip() == "True", out
    users = check.run("docker", "run", "--rm", "prism-worker:check", "id", "-u", capture=True).strip()
    assert users != "0", users
    return f"the API image has no torch; the worker runs as uid {users}"


URL = f"http://127.0.0.1:{API_PORT}"


def wait(what: str, probe: Callable[[], bool], seconds: float = 900) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if probe():
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"timed out waiting for {what}")


def status(job: str) -> dict:
    return httpx.get(f"{URL}/jobs/{job}", timeout=10).json()


def submit(image: bytes, **fields: str) -> str:
    r = httpx.post(f"{URL}/counterfactual", files={"image": ("phantom.png", image)}, data={**PROMPTS, **fields})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def done(job: str) -> dict:
    wait(f"job {job}", lambda: status(job)["status"] in ("succeeded", "failed", "canceled"))
    return status(job)


def stack_up(check: Check) -> str:
    check.compose("up", "-d")
    wait("the API and a ready worker", lambda: httpx.get(f"{URL}/readyz", timeout=5).status_code == 200)
    health = check.compose("ps", capture=True)
    return "redis, api, webhooks, worker up; /readyz 200\n\n```\n" + health.strip() + "\n```"


def readme_example(check: Check, image: bytes) -> str:
    job = submit(image, steps="10")
    final = done(job)
    assert final["status"] == "succeeded", final
    png = httpx.get(URL + final["result"]["files"]["counterfactual.png"]).content
    assert png.startswith(b"\x89PNG")
    return f"job {job} succeeded: S_CLIP {final['result']['s_clip']:.3f}, counterfactual.png {len(png)} bytes"


def kill_worker(check: Check, image: bytes) -> str:
    job = submit(image, steps="200")
    wait("the job running", lambda: status(job)["status"] == "running")
    check.compose("kill", "-s", "SIGKILL", "worker")
    check.compose("up", "-d", "--no-deps", "worker")
    final = done(job)
    assert final["status"] == "succeeded" and final["requeues"] == 1, final
    return f"job {job}: worker SIGKILLed while running, re-queued (requeues = 1), succeeded on the new worker"


def restart_redis(check: Check, image: bytes) -> str:
    check.compose("stop", "worker")
    jobs = [submit(image, steps="4") for _ in range(3)]
    check.compose("restart", "redis")
    wait("the API to see Redis again", lambda: httpx.get(f"{URL}/jobs/{jobs[0]}", timeout=5).status_code == 200)
    assert all(status(j)["status"] == "queued" for j in jobs)
    check.compose("start", "worker")
    finals = [done(j) for j in jobs]
    assert all(f["status"] == "succeeded" for f in finals), finals
    return f"{len(jobs)} jobs queued across a Redis restart (AOF) all succeeded"


def write_report(check: Check, started: str, out: Path) -> None:
    lines = [
        "# compose-check: both images built and the Compose stack run on this machine",
        "",
        f"Run {started} by `scripts/compose-check.sh` (its output, step by step). Machine: "
        f"{os.uname().sysname} {os.uname().machine}, {os.cpu_count()} cores, no GPU, no registry; "
        "dockerd from Debian's docker.io with `--bridge=none --iptables=false`, host networking.",
        "",
        "| step | seconds | outcome |",
        "| --- | --- | --- |",
    ]
    for what, seconds, outcome in check.rows:
        first, _, rest = outcome.partition("\n\n")
        lines.append(f"| {what} | {seconds:.0f} | {first} |")
    lines += ["", *[outcome.partition("\n\n")[2] for _, _, outcome in check.rows if "\n\n" in outcome]]
    out.write_text("\n".join(lines).rstrip() + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/var/tmp/prism-compose-check", help="dockerd's data, the base rootfs")
    parser.add_argument("--out", default=str(ROOT / "docs" / "deploy" / "compose-check.md"))
    args = parser.parse_args()
    check = Check(Path(args.work))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still tear down and stop dockerd
    daemon = start_dockerd(check)
    try:
        subprocess.run([sys.executable, "-m", "cli", "make-example", str(check.work / "example")], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        image = (check.work / "example" / "phantom.png").read_bytes()
        check.step("base images (debootstrap + docker import)", lambda: base_images(check))
        check.step("compose file", lambda: compose_file(check))
        check.step("build prism-api and prism-worker (CPU variant)", lambda: build(check))
        check.step("images: no torch in the API, a non-root worker", lambda: api_has_no_torch(check))
        check.step("docker-compose up", lambda: stack_up(check))
        check.step("README curl example in containers", lambda: readme_example(check, image))
        check.step("worker container killed mid-job", lambda: kill_worker(check, image))
        check.step("Redis restarted with jobs queued", lambda: restart_redis(check, image))
        logs = check.compose("logs", "--no-color", capture=True)
        assert "Traceback" not in logs, "a container logged a traceback: see " + str(check.work / "compose.log")
    finally:
        if (check.work / "compose.yml").exists():
            (check.work / "compose.log").write_text(check.compose("logs", "--no-color", capture=True))
            check.run("docker-compose", "-f", str(check.work / "compose.yml"), "down", "-v", check=False)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_report(check, started, Path(args.out))
    print(json.dumps({"report": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
