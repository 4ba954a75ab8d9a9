"""The streaming multipart check behind the 422 for text fields that are not UTF-8 and behind the
answers to forms that do not parse: it names what Starlette's parser refused, whatever the bytes."""

import asyncio

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartException, MultiPartParser

from service.api.middleware import MAX_TEXT_PART_BYTES, MultipartCheck
from tests.helpers import fuzz


def multipart(data: dict, files: dict) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://test/", data=data, files=files)
    return request.read(), request.headers["content-type"]


def checked(body: bytes, content_type: str, chunk: int) -> MultipartCheck | None:
    checker = MultipartCheck.for_content_type(content_type)
    if checker is None:
        return None
    for i in range(0, len(body), chunk):
        checker.feed(body[i : i + chunk])
    return checker


def check(body: bytes, content_type: str, chunk: int) -> list[str] | None:
    checker = checked(body, content_type, chunk)
    return None if checker is None else checker.bad


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


def test_a_text_field_over_the_part_limit_is_named_and_a_file_part_is_not():
    big = "x" * (MAX_TEXT_PART_BYTES + 1)
    body, content_type = multipart(
        {"original_prompt": big, "steps": "3"}, {"image": ("a.png", big.encode(), "image/png")}
    )
    checker = checked(body, content_type, 1 << 16)
    assert checker.oversized == ["original_prompt"] and checker.problem is None
    body, content_type = multipart({"original_prompt": big[1:]}, {"image": ("a.png", b"x", "image/png")})
    assert checked(body, content_type, 1 << 16).oversized == []


@pytest.mark.parametrize(
    ("body", "content_type", "loc", "needle"),
    [
        (b"--a\r\n", "multipart/form-data", ["header", "Content-Type"], "needs a boundary"),
        (b"--a\r\n", 'multipart/form-data; boundary=""', ["header", "Content-Type"], "needs a boundary"),
        (b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n", "multipart/form-data; boundary=b",
         ["body"], "has no name"),
        (b"--xx\r\nContent-Disposition: form-data; name=a\r\n\r\nb\r\n--xx--", "multipart/form-data; boundary=yy",
         ["body"], "malformed"),
    ],
    ids=["no-boundary", "empty-boundary", "no-name", "other-boundary"],
)  # fmt: skip
def test_what_breaks_the_framing_is_said(body, content_type, loc, needle):
    assert (problem := checked(body, content_type, 3).problem) is not None
    assert problem[0] == loc and needle in problem[1]


def starlette_refuses(body: bytes, content_type: str) -> bool:
    async def stream():
        yield body

    parser = MultiPartParser(Headers({"content-type": content_type}), stream())
    try:
        asyncio.run(parser.parse())
    except MultiPartException:
        return True
    return False


VALID, BOUNDARY_TYPE = multipart(
    {"original_prompt": "chest x-ray", "steps": "3"}, {"image": ("a.png", b"\x89PNG..", "image/png")}
)
MUTATION = st.tuples(st.integers(0, len(VALID)), st.integers(0, 12), st.binary(max_size=12))


@fuzz(500)
@given(
    mutations=st.lists(MUTATION, max_size=4),
    chunk=st.integers(1, 64),
    content_type=st.sampled_from([BOUNDARY_TYPE, "multipart/form-data", 'multipart/form-data; boundary="a b"']),
)
def test_any_mangled_form_is_checked_without_an_exception_and_every_refusal_is_explained(
    mutations, chunk, content_type
):
    """Bytes cut, replaced or inserted anywhere in a valid form, in any chunking: the check never
    raises, and whenever Starlette's parser refuses the body (a 400), the check says why."""
    body = VALID
    for at, cut, insert in mutations:
        body = body[:at] + insert + body[at + cut :]
    checker = checked(body, content_type, chunk)
    if starlette_refuses(body, content_type):
        assert checker.problem is not None or checker.oversized
