"""The raw multipart check behind the 422 for text fields that are not UTF-8."""

import httpx

from service.form_charset import non_utf8_fields


def multipart(data: dict, files: dict) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://test/", data=data, files=files)
    return request.read(), request.headers["content-type"]


def test_only_text_fields_that_are_not_utf8_are_named():
    body, content_type = multipart(
        {"original_prompt": "chest x-ray, café", "edit_prompt": b"caf\xe9", "steps": "3"},
        {"image": ("scan.png", b"\x89PNG\r\n\x1a\n\xff\xfe binary", "image/png")},
    )
    assert non_utf8_fields(body, content_type) == ["edit_prompt"]


def test_utf8_form_and_other_bodies_pass():
    body, content_type = multipart({"edit_prompt": "ünïcødé ✓"}, {"image": ("a.png", b"\xff" * 10, "image/png")})
    assert non_utf8_fields(body, content_type) == []
    assert non_utf8_fields(b"edit_prompt=caf%E9", "application/x-www-form-urlencoded") == []
    assert non_utf8_fields(b"not multipart at all", "multipart/form-data; boundary=xyz") == []
