"""Shared fixtures: one tiny random-weight model built offline per test session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.loading import ModelBundle, load_bundle
from models.tiny import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def bundle(tiny_model_dir: Path) -> ModelBundle:
    return load_bundle(tiny_model_dir, device="cpu")


def xray_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth grayscale test image in [0, 1] with structure the VAE can represent."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    img = 0.5 + 0.25 * np.sin(6 * xx + rng.uniform(0, 3)) * np.cos(4 * yy) + 0.05 * rng.standard_normal((height, width))
    return np.clip(img, 0, 1).astype(np.float32)


def write_png(path: Path, pixels: np.ndarray, bit_depth: int = 8) -> Path:
    if bit_depth == 16:
        Image.fromarray(np.round(pixels * 65535).astype(np.uint16)).save(path)
    else:
        Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L").save(path)
    return path


@pytest.fixture(scope="session")
def redis_server():
    from service.redis_server import LocalRedis

    with LocalRedis() as server:
        yield server


@pytest.fixture(scope="session")
def service(redis_server, tiny_model_dir, tmp_path_factory):
    """A real API process and one real worker process against the test redis-server."""
    from tests.service_harness import ApiProcess, service_env, start_worker, stop, wait_ready

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
