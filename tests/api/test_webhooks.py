"""Webhooks: signed the Standard Webhooks way, retried when the receiver fails, refused for
loopback URLs unless configured, delivered by their own process."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from service.contract.tenants import new_webhook_secret
from tests.stack import Cluster, poll, submit, wait_for

SECRET = new_webhook_secret()


class Receiver:
    """An HTTP server on loopback that keeps every request and fails the first ``fail`` of each event type."""

    def __init__(self, fail: int = 0) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.fail = fail
        answered: dict[str, int] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((dict(self.headers), body))
                kind = json.loads(body)["type"]
                answered[kind] = answered.get(kind, 0) + 1
                self.send_response(500 if answered[kind] <= outer.fail else 204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def verified(self) -> list[dict]:
        return [Webhook(SECRET).verify(body, headers) for headers, body in self.requests]

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def receiver():
    r = Receiver(fail=1)
    yield r
    r.close()


def test_started_and_completed_are_signed_and_retried(tmp_path, tiny_model_dir, receiver):
    settings = {
        "PRISM_WEBHOOK_ALLOW_PRIVATE": "true",
        "PRISM_WEBHOOK_SECRET": SECRET,
        "PRISM_WEBHOOK_RETRY_FIRST_S": "1",
    }
    with Cluster(tmp_path, tiny_model_dir, workers=1, webhook_sender=True, **settings) as c:
        job_id = submit(c.url, webhook=receiver.url).json()["id"]
        assert poll(c.url, job_id, {"succeeded", "failed"})["status"] == "succeeded"
        # each event fails once (500) and is delivered on its retry
        wait_for(lambda: len(receiver.requests), lambda n: n >= 4, "webhook deliveries")
        logs = c.logs()
    events = receiver.verified()
    assert [e["type"] for e in events].count("job.started") == 2
    assert [e["type"] for e in events].count("job.completed") == 2
    started = next(e for e in events if e["type"] == "job.started")
    completed = next(e for e in events if e["type"] == "job.completed")
    assert started["data"] == {"id": job_id, "status": "running"}
    assert completed["data"]["id"] == job_id and completed["data"]["status"] == "succeeded"
    assert -1 <= completed["data"]["result"]["s_clip"] <= 1
    ids = {headers["webhook-id"] for headers, _ in receiver.requests}
    assert len(ids) == 2  # a retry keeps its message id, so receivers can deduplicate
    headers, body = receiver.requests[-1]
    with pytest.raises(WebhookVerificationError):
        Webhook(new_webhook_secret()).verify(body, headers)
    assert receiver.url not in logs and "delivered" in logs


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("http://127.0.0.1:9/hook", "loopback"),
        ("http://10.1.2.3/hook", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("ftp://example.org/hook", "http or https"),
        ("not a url", "http or https"),
    ],
)
def test_private_and_non_http_urls_are_refused_by_default(service, url, needle):
    r = submit(service.url, webhook=url)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", "webhook"] and needle in detail["msg"]


def test_a_misspelt_field_is_refused_not_ignored(service):
    r = submit(service.url, webhok="https://example.org/hook")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "webhok"]
