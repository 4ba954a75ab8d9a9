"""The webhook sender (``prism webhook-worker``): its own RQ queue and process, so a slow receiver
never holds a GPU worker.

Each event is signed the Standard Webhooks way (``webhook-id``, ``webhook-timestamp``,
``webhook-signature``: HMAC-SHA256 of ``id.timestamp.body`` with the tenant's ``whsec_`` secret)
and posted; an answer other than 2xx, or none within 10 s, raises, so RQ retries the delivery
with exponential backoff (``service.contract.webhooks.RETRIES``, 21 minutes in all by default).
The URL is checked again before every try.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

import httpx
from redis import Redis
from rq import SimpleWorker
from rq.serializers import JSONSerializer
from standardwebhooks.webhooks import Webhook

from service.contract.settings import Settings, get_settings
from service.contract.tenants import TenantFile, signing_secret
from service.contract.webhooks import check_webhook_url, webhook_queue

log = logging.getLogger("prism.webhooks")
TIMEOUT_S = 10.0
MAINTENANCE_S = 30


class DeliveryFailed(Exception):
    """The receiver did not take the event; RQ retries the delivery."""


@lru_cache(maxsize=1)
def _tenants(path: str | None) -> TenantFile:
    return TenantFile(Path(path) if path else None)


def signed_headers(secret: str, message_id: str, body: str, when: datetime) -> dict[str, str]:
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": Webhook(secret).sign(message_id, when, body),
        "content-type": "application/json",
    }


def deliver(owner: str, url: str, message_id: str, event: dict) -> int:
    """Post one event (the RQ job function); returns the receiver's status code."""
    settings = get_settings()
    check_webhook_url(url, settings.webhook_allow_private)
    secret = signing_secret(_tenants(settings.api_keys_file), owner, settings.webhook_secret)
    if secret is None:
        raise DeliveryFailed("no secret to sign with")
    body = json.dumps(event, separators=(",", ":"))
    headers = signed_headers(secret, message_id, body, datetime.now(UTC))
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=TIMEOUT_S, follow_redirects=False)
    except httpx.HTTPError as exc:
        raise DeliveryFailed(f"webhook {message_id}: {type(exc).__name__}") from exc
    if not 200 <= response.status_code < 300:
        raise DeliveryFailed(f"webhook {message_id}: answered {response.status_code}")
    log.info("webhook %s (%s): delivered", message_id, event.get("type"))
    return response.status_code


class WebhookWorker(SimpleWorker):
    def handle_exception(self, job, *exc_info) -> None:
        """One line per failed try (RQ's handler would log the event and the URL)."""
        log.warning("webhook job %s: try failed (%s); RQ retries it", job.id, type(exc_info[1]).__name__)


def run_webhook_worker(settings: Settings, burst: bool = False) -> None:
    """Serve the webhook queue, with RQ's scheduler for the delayed retries. httpx's request log
    (which names the URL) is kept to warnings.

    RQ's scheduler lock outlives its holder by about a minute; a sender that
    did not stop cleanly (killed, Redis gone first) leaves it behind. A sender looks for a free lock
    at each maintenance pass, so passes every ``MAINTENANCE_S`` (RQ: 10 min) bound how long delayed
    retries wait after such a restart.
    """
    logging.getLogger("httpx").setLevel(logging.WARNING)
    redis = Redis.from_url(settings.redis_url)
    worker = WebhookWorker(
        [webhook_queue(redis, settings)],
        connection=redis,
        serializer=JSONSerializer,
        log_job_description=False,
        maintenance_interval=MAINTENANCE_S,
        worker_ttl=MAINTENANCE_S + 15,  # its blocking dequeue (ttl - 15 s) returns for each pass
    )
    worker.work(burst=burst, with_scheduler=True)
