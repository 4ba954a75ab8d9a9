"""Probes: ``/healthz`` (the process is alive) and ``/readyz`` (Redis and a worker are there)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.api.deps import SettingsDep, Store
from service.api.errors import retry_after
from service.api.schemas import Health

router = APIRouter()


@router.get("/healthz", response_model=Health, summary="The API process is alive")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    summary="Redis reachable and at least one worker alive",
    responses={503: {"model": Health, "description": "not ready"}},
)
def readyz(store: Store, settings: SettingsDep) -> Health | JSONResponse:
    try:
        store.redis.ping()
        workers = store.live_workers()
    except (RedisConnectionError, RedisTimeoutError):
        workers = None
    if not workers:
        body = Health(status="unavailable", redis=workers is not None, workers=0).model_dump()
        return JSONResponse(body, status_code=503, headers=retry_after(settings.retry_after_s))
    return Health(status="ok", redis=True, workers=workers)
