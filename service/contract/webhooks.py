"""Webhooks: the events a job sends, the check of the URL it sends them to, and how a delivery is
queued. Signed the Standard Webhooks way by the webhook sender (``worker.webhooks``), a separate
RQ queue and process, so a slow receiver never holds a GPU worker.

A URL must be http or https, and unless ``webhook_allow_private`` is set, none of the addresses
its host resolves to may be loopback, link-local, private, reserved or multicast (no requests
into the service's own network on a client's behalf). The sender checks again before each try.
"""

from __future__ import annotations

import ipaddress
import socket
import time
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field
from redis import Redis
from rq import Queue, Retry
from rq.serializers import JSONSerializer

from models.request.errors import InvalidInput
from service.contract.jobs import EventName, job_args
from service.contract.settings import Settings

DELIVER = "worker.webhooks.deliver"
RETRIES = 7
"""Exponential backoff from ``webhook_retry_first_s``: 10 s, 20 s, ... 640 s, 21 minutes in all."""


class WebhookEvent(BaseModel):
    """The body of a webhook: ``job.started``, ``job.completed`` (succeeded, failed or canceled) or
    ``batch.completed`` (every item of a batch has ended)."""

    type: Literal["job.started", "job.completed", "batch.completed"]
    timestamp: datetime
    data: Annotated[dict[str, Any], Field(description="id, status, and the result or error once completed")]


def check_webhook_url(url: str, allow_private: bool) -> str:
    """The URL if it may receive webhooks, else :class:`InvalidInput` naming ``webhook``."""
    try:
        parts = urlsplit(url)
        port = parts.port  # parsed on access: a port out of range or not a number raises here
    except ValueError:
        raise InvalidInput("webhook", "must be an http or https URL (its host or port cannot be read)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("webhook", "must be an http or https URL")
    if allow_private:
        return url
    try:
        infos = socket.getaddrinfo(parts.hostname, port or (443 if parts.scheme == "https" else 80))
    except (socket.gaierror, UnicodeError):
        raise InvalidInput("webhook", "its host does not resolve") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global or address.is_multicast:
            raise InvalidInput("webhook", "its host is a loopback, link-local, private or reserved address")
    return url


def webhook_queue(redis: Redis, settings: Settings) -> Queue:
    return Queue(settings.webhook_queue_name, connection=redis, serializer=JSONSerializer)


def notify(redis: Redis, settings: Settings, owner: str, url: str, event: WebhookEvent) -> None:
    """Queue one delivery, with its retries; the ``webhook-id`` stays the same across them."""
    webhook_queue(redis, settings).enqueue_call(
        DELIVER,
        kwargs={
            "owner": owner,
            "url": url,
            "message_id": f"msg_{uuid.uuid4().hex}",
            "event": event.model_dump(mode="json"),
        },
        retry=Retry(max=RETRIES, interval=[settings.webhook_retry_first_s * 2**k for k in range(RETRIES)]),
        timeout=60,
        result_ttl=settings.job_ttl_s,
        failure_ttl=settings.job_ttl_s,
        ttl=settings.job_ttl_s,
        description="prism webhook",
    )


def event(name: EventName, data: dict[str, Any], subject: Literal["job", "batch"] = "job") -> WebhookEvent:
    return WebhookEvent(type=f"{subject}.{name}", timestamp=datetime.fromtimestamp(time.time(), UTC), data=data)


def notify_job(redis: Redis, settings: Settings, job, name: EventName, data: dict[str, Any]) -> None:
    """Queue the ``name`` event of ``job`` if its request asked for it."""
    request = job_args(job).request
    if request.webhook and name in request.webhook_events:
        notify(redis, settings, job.meta.get("owner", ""), request.webhook, event(name, {"id": job.id, **data}))
