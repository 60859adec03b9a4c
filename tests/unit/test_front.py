"""The serving front's request heads: what it refuses itself, before the relay's http.client or the model server's
HTTP decoder would fail on them (the whole battery runs against real servers in tests/hostile.py)."""

from __future__ import annotations

import pytest
from imgclf.serving.front import Front, Limits, Refused, parse_head


def head(*lines: bytes) -> bytes:
    return b"\r\n".join([b"POST /invocations HTTP/1.1", *lines]) + b"\r\n\r\n"


@pytest.mark.parametrize("line, said", [
    (b"X-Foo: a\rb", "control character"),
    (b"X-Foo: a\x00b", "control character"),
    (b"X-Foo: a\x7fb", "control character"),
    (b"X-\xe9: v", "malformed header line"),
    (b"X Foo: v", "malformed header line"),
    (b"X-Foo : v", "malformed header line"),
    (b": v", "malformed header line"),
])
def test_header_names_and_values_that_cannot_be_relayed_are_refused(line, said):
    with pytest.raises(Refused, match=said) as refused:
        parse_head(head(b"Host: x", line))
    assert refused.value.status == 400


def test_tabs_and_latin1_text_in_values_are_kept():
    _, _, _, headers = parse_head(head(b"X-Foo:\t caf\xe9\tau lait \t"))
    assert headers["x-foo"] == "caf\u00e9\tau lait"


def test_a_relay_that_fails_midway_drops_its_connection():
    """http.client refuses some requests after the connection object began one: reusing it would fail every later
    request of that relay thread (CannotSendRequest), so it is dropped whatever went wrong."""
    front = Front(0, 9, Limits(max_body=1, idle_timeout=1, body_timeout=1, relay_timeout=1, max_connections=1,
                               max_requests=1))
    with pytest.raises(ValueError):
        front._relay("GET", "/ping", {"x-foo": "a\rb"}, b"")  # http.client checks before it connects
    assert front._local.mms is None
