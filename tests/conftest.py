"""Session fixtures: one tiny random-weight model built offline, one redis-server, one stack."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import pytest

from models.diffusion.components import ModelBundle, load_bundle
from models.diffusion.tiny import make_tiny_model


def pytest_configure(config: pytest.Config) -> None:
    """The suite's own PRISM_HOME: stacks the tests start in process (and ``prism up``) keep their
    Redis data and default blob store there, not in the user's ~/.cache/prism. Ctrl-C is heard
    again if the suite was started in the background (``cmd &`` ignores SIGINT and every process
    started from it inherits that): the tests that press Ctrl-C on a ``prism`` process need it."""
    os.environ.setdefault("PRISM_HOME", tempfile.mkdtemp(prefix="prism-home-"))
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def bundle(tiny_model_dir: Path) -> ModelBundle:
    return load_bundle(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def builtin() -> ModelBundle:
    """The shipped phantom model, whose edits are real (the tiny model's are noise)."""
    return load_bundle(None, device="cpu")


@pytest.fixture(scope="session")
def redis_server():
    from cli.local_redis import LocalRedis

    with LocalRedis() as server:
        yield server


@pytest.fixture(scope="session")
def builtin_service(tmp_path_factory):
    """A stack serving the built-in phantom model (with its classifier): real edits, slower jobs."""
    from models.weights.builtin import BUILTIN_DIR
    from tests.stack import Cluster

    with Cluster(tmp_path_factory.mktemp("builtin-stack"), BUILTIN_DIR, workers=1) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def service(redis_server, tiny_model_dir, tmp_path_factory):
    """A real API process and one real worker process against the test redis-server."""
    from tests.stack import ApiProcess, service_env, start_worker, stop, wait_ready

    logs = tmp_path_factory.mktemp("service-logs")
    env = service_env(redis_server.url, tiny_model_dir)
    worker = start_worker(env, logs / "worker.log")
    api = ApiProcess(env, logs / "api.log")
    try:
        wait_ready(api.url)
        yield api
    finally:
        api.stop()
        stop(worker)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A real PACS (Orthanc with DICOMweb, ``tests/pacs.py``), started once: a stop takes seconds."""
    from tests.pacs import Orthanc

    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server
    finally:
        server.close()
