"""The deployment files: compose properties the operations team relies on."""

from pathlib import Path

import yaml

from service.contract.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_redis_is_durable_and_never_evicts():
    redis = _compose()["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_the_worker_holds_the_node_s_gpus_one_process_each_and_mounts_weights_read_only():
    worker = _compose()["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert worker["command"] == ["prism", "worker", "--devices", "all"]
    grace = int(worker["stop_grace_period"].removesuffix("s"))
    assert grace > Settings().stop_grace_s  # Docker waits for the jobs in hand before it kills
    assert any(v.endswith(":/models:ro") for v in worker["volumes"])
    assert worker["environment"]["PRISM_MODEL_DIR"].startswith("/models/")
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_api_talks_to_redis_and_image_has_no_torch():
    api = _compose()["services"]["api"]
    assert api["environment"]["PRISM_REDIS_URL"] == "redis://redis:6379/0"
    assert api["build"]["dockerfile"] == "docker/api.Dockerfile"
    lines = (ROOT / "docker" / "requirements-api.txt").read_text().lower().splitlines()
    packages = {line.split("==")[0] for line in lines if line and not line.startswith("#")}
    assert {"fastapi", "uvicorn", "redis", "rq", "python-multipart"} <= packages
    assert not packages & {"torch", "diffusers", "safetensors"}
    dockerfile = [line for line in (ROOT / "docker" / "api.Dockerfile").read_text().splitlines() if line[:1] != "#"]
    assert "pip install --no-cache-dir --no-deps ." in "\n".join(dockerfile)
    assert not any("torch" in line for line in dockerfile)


def test_worker_image_does_not_bake_weights():
    dockerfile = (ROOT / "docker" / "worker.Dockerfile").read_text()
    assert 'VOLUME ["/models"' in dockerfile
    assert ".safetensors" not in dockerfile.split("ENV PRISM_DEVICE")[0]
    assert 'prism", "worker' in dockerfile


def test_images_copy_every_package_they_install():
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [pattern.rstrip("*") for pattern in include]
    for name in ("api", "worker"):
        dockerfile = (ROOT / "docker" / f"{name}.Dockerfile").read_text()
        missing = [p for p in packages if f"COPY {p} /app/{p}" not in dockerfile]
        assert not missing, f"{name}.Dockerfile does not copy {missing}"


def test_both_images_run_unprivileged_with_healthchecks_and_a_small_context():
    for name, probe in (("api", "/healthz"), ("worker", "worker-probe")):
        dockerfile = (ROOT / "docker" / f"{name}.Dockerfile").read_text()
        assert "USER prism" in dockerfile and "--uid 10001" in dockerfile
        assert "HEALTHCHECK" in dockerfile and probe in dockerfile.split("HEALTHCHECK")[1]
        assert dockerfile.count("ARG BASE=") == 1 and "FROM ${BASE}" in dockerfile  # compose-check's CPU bases
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "tests"} <= set(ignored)  # the context is the packages, not gigabytes of virtualenv
    worker = (ROOT / "docker" / "worker.Dockerfile").read_text()
    assert "chown -R prism /cache" in worker  # the inversion cache volume is writable by the worker


def test_the_check_override_keeps_every_container_on_the_host_network():
    override = yaml.safe_load((ROOT / "docker" / "compose.check.yml").read_text())
    assert set(override["services"]) == set(_compose()["services"])
    assert all(service["network_mode"] == "host" for service in override["services"].values())


def test_the_api_and_the_worker_share_the_blob_store_and_redis_is_bounded_below_its_limit():
    services = _compose()["services"]
    for name in ("api", "worker"):
        url = services[name]["environment"]["PRISM_BLOB_URL"]
        assert url == "file:///data/blobs" and "blobs:/data/blobs" in services[name]["volumes"], name
    assert "blobs" in _compose()["volumes"]
    command = services["redis"]["command"]
    maxmemory = command[command.index("--maxmemory") + 1]
    limit = services["redis"]["deploy"]["resources"]["limits"]["memory"]
    assert int(maxmemory.removesuffix("gb")) * 1024 < int(limit.removesuffix("M"))
    for name in ("api", "worker"):  # the volume starts owned by the image's user, who writes to it
        assert "/data/blobs" in (ROOT / "docker" / f"{name}.Dockerfile").read_text()
