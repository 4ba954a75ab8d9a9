"""The streaming multipart check behind the 422 for text fields that are not UTF-8."""

import httpx
import pytest

from service.api.middleware import Utf8FieldCheck


def multipart(data: dict, files: dict) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://test/", data=data, files=files)
    return request.read(), request.headers["content-type"]


def check(body: bytes, content_type: str, chunk: int) -> list[str] | None:
    checker = Utf8FieldCheck.for_content_type(content_type)
    if checker is None:
        return None
    for i in range(0, len(body), chunk):
        checker.feed(body[i : i + chunk])
    return checker.bad


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_only_text_fields_that_are_not_utf8_are_named_whatever_the_chunking(chunk):
    body, content_type = multipart(
        {"original_prompt": "chest x-ray, café ✓", "edit_prompt": b"caf\xe9", "steps": "3"},
        {"image": ("scan.png", b"\x89PNG\r\n\x1a\n\xff\xfe binary", "image/png")},
    )
    assert check(body, content_type, chunk) == ["edit_prompt"]


def test_a_multibyte_character_split_across_chunks_is_valid():
    body, content_type = multipart({"edit_prompt": "ü" * 50}, {"image": ("a.png", b"\x89PNG", "image/png")})
    assert check(body, content_type, 3) == []


def test_a_truncated_character_at_the_end_of_a_field_is_invalid():
    body, content_type = multipart(
        {"edit_prompt": b"ok" + "ü".encode()[:1]}, {"image": ("a.png", b"\x89PNG", "image/png")}
    )
    assert check(body, content_type, 5) == ["edit_prompt"]


def test_utf8_form_and_other_bodies_pass():
    body, content_type = multipart({"edit_prompt": "ünïcødé ✓"}, {"image": ("a.png", b"\xff" * 10, "image/png")})
    assert check(body, content_type, 4) == []
    assert check(b"edit_prompt=caf%E9", "application/x-www-form-urlencoded", 4) is None
    assert check(b"not multipart at all", "multipart/form-data; boundary=xyz", 4) == []
