"""Probes: ``/livez`` and ``/healthz`` (the process is alive), ``/readyz`` (Redis and a worker are
there); and ``/metrics`` in Prometheus' text format."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.api.deps import SettingsDep, Store
from service.api.docs import RETRY_AFTER
from service.api.errors import retry_after
from service.api.metrics import job_counts
from service.api.schemas import Health, ScalingDemand

router = APIRouter(tags=["health"])
observability = APIRouter(tags=["observability"])


@router.get("/livez", operation_id="livez", response_model=Health, summary="The API process is alive")
def livez() -> Health:
    return Health(status="ok")


@router.get("/healthz", operation_id="healthz", response_model=Health, summary="The API process is alive (as /livez)")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    operation_id="readyz",
    response_model=Health,
    summary="Redis reachable and at least one worker alive",
    responses={503: {"model": Health, "description": "not ready", "headers": RETRY_AFTER}},
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


@observability.get(
    "/metrics",
    operation_id="metrics",
    summary="Prometheus metrics: jobs by status, queue depth, queue wait and run time, phases, live workers",
    response_class=Response,
    responses={
        200: {"description": "Prometheus text format", "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}
    },
)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)


@observability.get(
    "/scaling",
    operation_id="scaling",
    response_model=ScalingDemand,
    summary="Jobs queued and running: the workers an autoscaler should keep (KEDA metrics-api, JSON)",
)
def scaling(request: Request, settings: SettingsDep) -> ScalingDemand:
    """Running jobs count too: they have left the queue's list, and a pool scaled on the list alone
    would shrink under busy workers. A worker serves ``PRISM_WORKER_PACK`` jobs at a time."""
    counts = job_counts(request.app.state.redis, settings)
    jobs = counts["queued"] + counts["running"]
    return ScalingDemand(
        queued=counts["queued"], running=counts["running"], workers_wanted=-(-jobs // settings.worker_pack)
    )
