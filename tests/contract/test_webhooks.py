"""The webhook URL check: any text is a URL it keeps or a refusal naming ``webhook``, never another
exception (a port out of range or a broken IPv6 literal were 500s)."""

import socket
from unittest import mock

import pytest
from hypothesis import given, provisional
from hypothesis import strategies as st

from models.request.errors import InvalidInput
from service.contract.webhooks import check_webhook_url
from tests.helpers import fuzz

PUBLIC = "93.184.215.14"
_getaddrinfo = socket.getaddrinfo


def numeric_only(host, port, *args, **kwargs):
    """getaddrinfo without DNS: a literal address as the system reads it (the same refusals of
    names it cannot encode), any other name a public address."""
    try:
        return _getaddrinfo(host, port, *args, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        return _getaddrinfo(PUBLIC, port, *args, flags=socket.AI_NUMERICHOST)


URL_PART = st.sampled_from(
    ["http://", "https://", "ftp://", "//", "[", "]", "::1", "127.0.0.1", "10.0.0.1", "example.org", ":", "@",
     "99999", "-1", "abc", "/", "?", "#", "%00", "\x00", "é", "..", "xn--", "0x7f.1", "[fe80::1%eth0]", " "]
)  # fmt: skip
URLS = st.one_of(
    st.text(max_size=60),
    provisional.urls(),
    st.lists(URL_PART, max_size=8).map("".join),
)


@fuzz(1000)
@given(url=URLS, allow_private=st.booleans())
def test_any_text_is_kept_or_refused_naming_the_field(url, allow_private):
    with mock.patch("socket.getaddrinfo", numeric_only):
        try:
            assert check_webhook_url(url, allow_private) == url
        except InvalidInput as exc:
            assert exc.field == "webhook" and exc.message


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("http://example.org:99999/hook", "cannot be read"),
        ("http://example.org:port/hook", "cannot be read"),
        ("http://[::1/hook", "cannot be read"),
        ("ftp://example.org/hook", "http or https"),
        ("http://127.0.0.1:8080/hook", "loopback"),
        ("http://[fe80::1]/hook", "loopback, link-local"),
    ],
)
def test_urls_that_cannot_receive_webhooks_are_refused(url, needle):
    with mock.patch("socket.getaddrinfo", numeric_only), pytest.raises(InvalidInput, match=needle):
        check_webhook_url(url, allow_private=False)
    with mock.patch("socket.getaddrinfo", numeric_only):
        assert (
            check_webhook_url("https://example.org:8443/hook", allow_private=False) == "https://example.org:8443/hook"
        )
