"""Bad input, Redis faults, cancellation and tenants, against real Redis, workers and an API."""

import io
import struct
import subprocess
import time
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image
from redis import Redis

from service.contract.blobs import file_blob, input_blob
from tests.helpers import png_bytes, xray_like
from tests.stack import Cluster, poll, prism, submit, wait_for, wait_ready, wait_running


def png(pixels: np.ndarray | None = None, **save) -> bytes:
    return png_bytes(xray_like(64, 64) if pixels is None else pixels, **save)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir):
    """One cluster for the tests that do not break it (its logs then cover all of them)."""
    settings = {"PRISM_MAX_UPLOAD_BYTES": "200000", "PRISM_RATE_LIMIT_PER_MINUTE": "100000"}
    with Cluster(tmp_path_factory.mktemp("cluster"), tiny_model_dir, workers=1, **settings) as c:
        yield c


# ---- input ---------------------------------------------------------------------------------


def test_body_limit_with_content_length_and_chunked(cluster):
    big = png(np.random.default_rng(0).random((500, 500)))
    assert len(big) > 200000
    r = submit(cluster.url, big)
    assert r.status_code == 413 and r.json()["detail"][0]["type"] == "too_large"

    def chunks():
        body = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'
        yield body
        for _ in range(30):
            yield b"\0" * 10000

    r = httpx.post(
        f"{cluster.url}/counterfactual",
        content=chunks(),
        headers={"Content-Type": "multipart/form-data; boundary=b"},
        timeout=30,
    )
    assert r.status_code == 413, r.text
    assert "request body exceeds 200000 bytes" in r.json()["detail"][0]["msg"]


def _apng() -> bytes:
    frames = [Image.fromarray(np.full((16, 16), v, np.uint8)) for v in (0, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buf, format="PNG")
    return buf.getvalue()


def _huge_png(side: int) -> bytes:
    """A PNG header announcing side x side pixels (Pillow refuses it on opening, as a bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _coloured_png(mode: str) -> bytes:
    img = Image.new("RGB", (24, 24), (100, 100, 100))
    img.paste((250, 100, 100), (0, 0, 8, 8))
    buf = io.BytesIO()
    img.convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(mode: str = "RGB", exif_orientation: int | None = None, colour: tuple[int, ...] | None = None) -> bytes:
    img = Image.new(mode, (40, 20), colour or ((90, 90, 90) if mode == "RGB" else (0, 0, 0, 0)))
    buf = io.BytesIO()
    exif = Image.Exif()
    if exif_orientation:
        exif[0x0112] = exif_orientation
    img.save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "content", "status", "needle"),
    [
        ("gif", b"GIF89a" + b"\0" * 50, 415, "not a PNG, JPEG or DICOM"),
        ("bmp renamed .png", b"BM" + b"\0" * 80, 415, "not a PNG, JPEG or DICOM"),
        ("empty", b"", 422, "empty"),
        ("truncated", png()[:100], 422, "truncated"),
        ("animated", _apng(), 422, "multi-frame"),
        ("bomb", _bomb(), 413, "pixels"),
        ("20000 x 20000", _huge_png(20_000), 413, "more than 16777216 pixels, the limit"),
        ("colour JPEG", _jpeg(colour=(10, 200, 30)), 422, "colour image (RGB; its channels differ by up to"),
        ("colour PNG", _coloured_png("RGBA"), 422, "colour image (RGBA; its channels differ by up to 150/255)"),
        ("colour palette PNG", _coloured_png("P"), 422, "colour image (P; its channels differ by up to"),
        ("garbage after signature", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 422, "cannot be decoded"),
    ],
)
def test_bad_images(cluster, name, content, status, needle):
    r = submit(cluster.url, content)
    assert r.status_code == status, (name, r.text)
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", "image"] and needle in detail["msg"]


@pytest.mark.parametrize(
    ("image", "expected_size"),
    [
        (png(xray_like(30, 50)), (50, 30)),
        (_jpeg("RGB"), (40, 20)),
        (_jpeg("CMYK"), (40, 20)),
        (_jpeg("RGB", exif_orientation=6), (20, 40)),
    ],
)
def test_accepted_image_kinds_come_back_at_their_size(cluster, image, expected_size):
    r = submit(cluster.url, image)
    assert r.status_code == 202, r.text
    status = poll(cluster.url, r.json()["id"], {"succeeded", "failed"})
    assert status["status"] == "succeeded", status
    cf = httpx.get(cluster.url + status["result"]["files"]["counterfactual.png"]).content
    assert Image.open(io.BytesIO(cf)).size == expected_size


def test_grey_stored_in_colour_and_16_bit_png_are_accepted_and_the_result_says_which(cluster):
    rgba = io.BytesIO()
    Image.new("RGBA", (24, 24), (120, 120, 120, 128)).save(rgba, format="PNG")
    wide = io.BytesIO()
    Image.fromarray((xray_like(32, 32) * 65535).astype(np.uint16)).save(wide, format="PNG")
    for content, colour in ((rgba.getvalue(), "RGBA"), (wide.getvalue(), None)):
        r = submit(cluster.url, content, steps="2")
        assert r.status_code == 202, r.text
        assert poll(cluster.url, r.json()["id"], {"succeeded", "failed"})["result"]["input_colour"] == colour


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"original_prompt": "chest\x00x-ray"}, "original_prompt"),
        ({"edit_prompt": "chest x-ray\x1b[31m"}, "edit_prompt"),
        ({"edit_prompt": "\u200b"}, "edit_prompt"),
        ({"edit_prompt": b"chest x-ray of a patient without caf\xe9 devices"}, "edit_prompt"),
        ({"cross_replace_steps": "1.5"}, "cross_replace_steps"),
        ({"cross_replace_steps": "nan"}, "cross_replace_steps"),
        ({"edit_word_weight": "-1"}, "edit_word_weight"),
        ({"guidance_scale": "inf"}, "guidance_scale"),
        ({"steps": "100000"}, "steps"),
        ({"seed": "-5"}, "seed"),
        ({"self_replace_steps": ",".join(["0.5"] * 17)}, "self_replace_steps"),
    ],
)
def test_bad_fields_are_422_naming_the_field(cluster, fields, field):
    r = submit(cluster.url, **fields)
    assert r.status_code == 422, r.text
    assert field in {str(p) for d in r.json()["detail"] for p in d["loc"]}
    assert "input" not in r.json()["detail"][0]  # the request text is never echoed back


# ---- Redis and cancellation ---------------------------------------------------------------


def test_redis_restart(tmp_path, tiny_model_dir):
    with Cluster(tmp_path, tiny_model_dir, workers=0) as c:
        accepted = submit(c.url).json()["id"]
        c.redis.stop()
        r = submit(c.url)
        assert r.status_code == 503 and r.headers["Retry-After"]
        down = httpx.get(f"{c.url}/jobs/{accepted}")
        assert down.status_code == 503 and down.headers["Retry-After"]
        c.redis.start()
        assert httpx.get(f"{c.url}/jobs/{accepted}").json()["status"] == "queued"  # AOF kept it
        c.workers.append(c.add_worker())
        wait_ready(c.url)
        assert poll(c.url, accepted, {"succeeded", "failed"})["status"] == "succeeded"
        c.redis.stop()
        time.sleep(1.5)
        c.redis.start()
        after = submit(c.url).json()["id"]  # the same worker, reconnected
        assert poll(c.url, after, {"succeeded", "failed"})["status"] == "succeeded"
        assert c.workers[0].poll() is None


def test_cancel_queued_and_running(tmp_path, tiny_model_dir):
    with Cluster(tmp_path, tiny_model_dir, workers=0) as c:
        job_id = submit(c.url).json()["id"]
        r = httpx.post(f"{c.url}/jobs/{job_id}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "canceled"
        assert not (c.blobs / input_blob(job_id)).exists()
        assert httpx.post(f"{c.url}/jobs/nope/cancel").status_code == 404

        c.workers.append(c.add_worker())
        wait_ready(c.url)
        running = submit(c.url, steps="60").json()["id"]
        at_cancel = wait_running(c.url, running)
        asked = httpx.post(f"{c.url}/jobs/{running}/cancel")
        assert asked.status_code == 202 and asked.json()["status"] == "running"
        final = poll(c.url, running, {"succeeded", "failed", "canceled"})
        assert final["status"] == "canceled" and final["error"] is None and final["result"] is None
        # it stopped inside the phase it was in, long before that phase's last step
        assert final["progress"]["phase"] == at_cancel["progress"]["phase"]
        assert final["progress"]["step"] < final["progress"]["total"] / 2
        assert not Redis.from_url(c.redis.url).keys(f"prism:*{running}*")
        again = httpx.post(f"{c.url}/jobs/{running}/cancel")
        assert again.status_code == 200 and again.json()["status"] == "canceled"
        done = submit(c.url, steps="2").json()["id"]
        poll(c.url, done, {"succeeded"})
        assert httpx.post(f"{c.url}/jobs/{done}/cancel").status_code == 409
        lines = httpx.get(f"{c.url}/metrics").text.splitlines()
        jobs = {line.split('"')[1]: float(line.split()[1]) for line in lines if line.startswith("prism_jobs{")}
        assert (jobs["canceled"], jobs["failed"], jobs["succeeded"]) == (2, 0, 1)  # a cancel is no failure


def test_idempotency_key(cluster):
    headers = {"Idempotency-Key": "req-42"}
    first = submit(cluster.url, headers=headers)
    again = submit(cluster.url, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    other = submit(cluster.url, headers=headers, steps="4")
    assert other.status_code == 409
    assert submit(cluster.url).json()["id"] != first.json()["id"]


def test_backpressure(tmp_path, tiny_model_dir):
    with Cluster(tmp_path, tiny_model_dir, workers=0, PRISM_MAX_QUEUE_DEPTH="2") as c:
        assert [submit(c.url).status_code for _ in range(2)] == [202, 202]
        r = submit(c.url)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert Redis.from_url(c.redis.url).llen("rq:queue:prism") == 2


# ---- tenants and patient data --------------------------------------------------------------


def _add_key(keys_file, name: str) -> str:
    out = subprocess.run(
        prism("keys", "add", name, "--file", str(keys_file)),
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def test_api_keys_ownership_and_rate_limit(tmp_path, tiny_model_dir):
    keys = tmp_path / "keys"
    alice, bob = _add_key(keys, "alice"), _add_key(keys, "bob")
    assert alice not in keys.read_text() and len(alice) >= 40
    settings = {"PRISM_AUTH": "on", "PRISM_API_KEYS_FILE": str(keys), "PRISM_RATE_LIMIT_PER_MINUTE": "3"}
    with Cluster(tmp_path, tiny_model_dir, workers=1, **settings) as c:
        assert submit(c.url).status_code == 401
        assert submit(c.url, headers={"X-API-Key": "wrong"}).status_code == 401
        a = {"X-API-Key": alice}
        b = {"X-API-Key": bob}
        job_id = submit(c.url, headers=a).json()["id"]
        status = poll(c.url, job_id, {"succeeded", "failed", "canceled"}, headers=a)
        assert status["status"] == "succeeded"
        assert httpx.get(f"{c.url}/jobs/{job_id}").status_code == 401
        assert httpx.get(f"{c.url}/jobs/{job_id}", headers=b).status_code == 404
        assert httpx.get(f"{c.url}/jobs/{job_id}/files/counterfactual.png", headers=b).status_code == 404
        assert httpx.post(f"{c.url}/jobs/{job_id}/cancel", headers=b).status_code == 404
        assert httpx.get(f"{c.url}/jobs/{job_id}/files/counterfactual.png", headers=a).status_code == 200
        refused = [submit(c.url, headers=a, steps="0"), submit(c.url, b"GIF89a", headers=a)]
        refused.append(httpx.post(f"{c.url}/counterfactual", json={}, headers=a))
        assert [r.status_code for r in refused] == [422, 415, 415]  # none of these counts towards the limit
        codes = [submit(c.url, headers=a, steps="1").status_code for _ in range(3)]
        assert codes[:2] == [202, 202] and codes[2] == 429
        assert submit(c.url, headers=b, steps="1").status_code == 202  # limits are per key
        assert httpx.get(f"{c.url}/healthz").status_code == 200  # probes need no key


def test_logs_hold_no_prompts_file_names_or_pixels(cluster):
    secret_source = "chest x-ray of patient zebra-quokka with support devices"
    secret_edit = "chest x-ray of patient zebra-quokka without support devices"
    files = {"image": ("jane-doe-mrn-889977.png", png(), "image/png")}
    data = {"original_prompt": secret_source, "edit_prompt": secret_edit, "steps": "3", "self_replace_steps": "0.5"}
    job_id = httpx.post(f"{cluster.url}/counterfactual", files=files, data=data).json()["id"]
    assert poll(cluster.url, job_id, {"succeeded", "failed"})["status"] == "succeeded"
    bad = submit(cluster.url, original_prompt="zebra-quokka " * 100)
    assert bad.status_code == 422 and "zebra" not in bad.text
    logs = wait_for(cluster.logs, lambda text: bad.headers["X-Request-ID"] in text, "the 422's log line", stall_s=60)
    assert job_id in logs
    for needle in ("zebra", "quokka", "jane-doe", "889977", "IHDR", "support devices"):
        assert needle not in logs, needle


def test_job_ids_unguessable_and_data_expires(cluster):
    ids = [submit(cluster.url).json()["id"] for _ in range(5)]
    assert len(set(ids)) == 5 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert len({i[:8] for i in ids}) == 5
    r = Redis.from_url(cluster.redis.url)
    assert 0 < r.ttl(f"rq:job:{ids[-1]}") <= 24 * 3600  # the record's TTL; its blobs are swept after it
    assert (cluster.blobs / input_blob(ids[-1])).exists()
    status = poll(cluster.url, ids[0], {"succeeded"})
    assert 0 < r.ttl(f"rq:job:{ids[0]}") <= 24 * 3600 and status["status"] == "succeeded"
    assert (cluster.blobs / file_blob(ids[0], "counterfactual.png")).exists()
    assert not (cluster.blobs / input_blob(ids[0])).exists()  # inputs are removed once the job succeeded
