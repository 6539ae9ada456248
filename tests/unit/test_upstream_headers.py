"""Header hygiene at the upstream seam (`proxy.upstream`): what goes to DeepSeek, what comes
back, and the hop-by-hop headers that go neither way.

Headers arrive as aiohttp hands them over, a case-insensitive multidict."""

from __future__ import annotations

from multidict import CIMultiDict

from proxy.upstream import HOP_BY_HOP, hop_by_hop, request_headers, response_headers

KEY = "sk-upstream-proxy-key"


def test_hop_by_hop_is_the_fixed_set_plus_what_connection_names() -> None:
    assert hop_by_hop(CIMultiDict()) == HOP_BY_HOP
    assert {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    } == HOP_BY_HOP
    named = hop_by_hop(CIMultiDict({"connection": " X-Trace ,, Keep-Alive,x-other "}))
    assert named == HOP_BY_HOP | {"x-trace", "x-other"}


def test_the_client_key_never_goes_upstream_and_the_proxy_key_does() -> None:
    for name in ("Authorization", "authorization", "AUTHORIZATION"):
        sent = request_headers(CIMultiDict({name: "Bearer sk-proxy-client", "X-Keep": "1"}), KEY)
        assert sent == {
            "X-Keep": "1",
            "Authorization": f"Bearer {KEY}",
            "Accept-Encoding": "identity",
        }


def test_request_headers_keep_only_what_may_travel() -> None:
    client = CIMultiDict(
        [
            ("Host", "proxy.internal"),
            ("Content-Type", "application/json"),
            ("Content-Length", "42"),
            ("User-Agent", "OpenAI/Python 1.40"),
            ("X-Stainless-Retry-Count", "0"),
            ("Accept", "text/event-stream"),
            ("Accept-Encoding", "gzip, br"),
            ("Content-Encoding", "gzip"),
            ("X-Api-Key", "sk-proxy-client"),
            ("Cookie", "session=1"),
            ("Forwarded", "for=10.0.0.1"),
            ("X-Forwarded-For", "10.0.0.1"),
            ("X-Forwarded-Host", "evil.example"),
            ("X-Forwarded-Proto", "http"),
            ("X-Real-IP", "10.0.0.1"),
            ("Expect", "100-continue"),
            ("Proxy-Authorization", "Basic eDp5"),
            ("TE", "trailers"),
            ("Upgrade", "h2c"),
            ("Transfer-Encoding", "chunked"),
            ("Keep-Alive", "timeout=5"),
        ]
    )
    assert request_headers(client, KEY) == {
        "Content-Type": "application/json",
        "User-Agent": "OpenAI/Python 1.40",
        "X-Stainless-Retry-Count": "0",
        "Accept": "text/event-stream",
        "Authorization": f"Bearer {KEY}",
        "Accept-Encoding": "identity",
    }


def test_headers_named_by_connection_are_dropped_in_either_case() -> None:
    client = CIMultiDict(
        [("connection", "X-Hop, x-other"), ("x-hop", "1"), ("X-Other", "2"), ("X-Keep", "3")]
    )
    assert request_headers(client, KEY) == {
        "X-Keep": "3",
        "Authorization": f"Bearer {KEY}",
        "Accept-Encoding": "identity",
    }


def test_every_connection_field_line_counts() -> None:
    """RFC 9110 5.3: a list header may be split over several field lines."""
    client = CIMultiDict([("Connection", "keep-alive"), ("Connection", "X-Hop"), ("X-Hop", "1")])
    assert "X-Hop" not in request_headers(client, KEY)


def test_response_headers_drop_framing_cookies_and_server_identity() -> None:
    upstream = CIMultiDict(
        [
            ("Content-Type", "text/event-stream; charset=utf-8"),
            ("x-ds-trace-id", "abc123"),
            ("Cache-Control", "no-cache"),
            ("Content-Length", "120"),
            ("Content-Encoding", "gzip"),
            ("Transfer-Encoding", "chunked"),
            ("Set-Cookie", "tracking=1"),
            ("Server", "nginx"),
            ("Date", "Mon, 02 Nov 2026 01:30:00 GMT"),
            ("Connection", "keep-alive, X-Upstream-Hop"),
            ("X-Upstream-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
        ]
    )
    assert response_headers(upstream) == {
        "Content-Type": "text/event-stream; charset=utf-8",
        "x-ds-trace-id": "abc123",
        "Cache-Control": "no-cache",
    }


def test_headers_without_connection_pass_through_in_order() -> None:
    upstream = CIMultiDict([("Content-Type", "application/json"), ("x-ds-trace-id", "t")])
    assert list(response_headers(upstream).items()) == [
        ("Content-Type", "application/json"),
        ("x-ds-trace-id", "t"),
    ]
