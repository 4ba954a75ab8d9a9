"""Workers of one host share inversions: a second edit of an image skips its inversion."""

from tests.helpers import png_bytes, xray_like
from tests.stack import Cluster, poll, stop, submit, wait_ready


def test_a_second_edit_on_another_worker_reuses_the_inversion(tmp_path, tiny_model_dir):
    cache = tmp_path / "inversions"
    with Cluster(tmp_path, tiny_model_dir, workers=1, PRISM_INVERSION_CACHE_DIR=str(cache)) as c:
        image = png_bytes(xray_like(40, 56, seed=11))
        first = poll(c.url, submit(c.url, image, steps="6").json()["id"], {"succeeded", "failed"})
        assert first["status"] == "succeeded", first
        assert len(list(cache.glob("*.safetensors"))) == 1
        stop(c.workers.pop())
        c.workers.append(c.add_worker())
        wait_ready(c.url)
        second = submit(c.url, image, steps="6", edit_prompt="chest x-ray of a patient")
        second = poll(c.url, second.json()["id"], {"succeeded", "failed"})
    assert second["status"] == "succeeded", second
    assert first["result"]["inversion"]["cached"] is False and second["result"]["inversion"]["cached"] is True
    assert second["result"]["inversion"]["key"] == first["result"]["inversion"]["key"]
    assert "null_text" in first["result"]["timings"] and "null_text" not in second["result"]["timings"]
