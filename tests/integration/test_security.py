"""Secrets and trust (shared/reliability.md): the upstream key never leaks, no request can
redirect the proxy, any Authorization header is a clean 401, malformed upstream data is
harmless, and the code holds no eval, unsafe YAML or string-built SQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest

from proxy.app import POLLER
from proxy.ledger.store import SQLiteLedger
from proxy.ledger.writer import LedgerWriter
from proxy.pricing import PriceBook
from proxy.reconcile.live import LiveBook, SQLiteSource
from proxy.reconcile.poller import Polled
from proxy.records import FanOut, LogSink
from tests.conftest import ROOT
from tests.support.fake_deepseek import FakeDeepSeek
from tests.support.fake_deepseek_shapes import FAKE_UPSTREAM_KEY, Reply
from tests.support.proxy_harness import TEAM_KEYS, RunningProxy, raw_request, running_proxy
from tests.support.requests import AUTH, CHAT, SMALL_USAGE, STREAM

CANARY = FAKE_UPSTREAM_KEY  # the proxy's upstream key in these tests: it must never surface


def leaks(text: str) -> list[str]:
    """Every way the key could show: whole, DeepSeek's ****-echo of its end, or its tail."""
    found = [m for m in (CANARY, CANARY[-10:]) if m in text]
    found += re.findall(r"\*+" + re.escape(CANARY[-4:]), text)
    return found


async def test_canary_key_appears_nowhere(
    fake: FakeDeepSeek, book: PriceBook, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")  # every logger, every level
    ledger = tmp_path / "ledger.sqlite3"
    store = SQLiteLedger(ledger, ZoneInfo("Asia/Shanghai"))
    writer = LedgerWriter(store)
    fake.enqueue(
        Reply(usage=SMALL_USAGE),
        Reply(usage=SMALL_USAGE),
        Reply(status=401),
        Reply(status=402),
        Reply(
            status=500,
            error_body=b'{"error":{"message":"bad key ' + CANARY.encode() + b' rejected"}}',
        ),
        Reply(status=429),
        Reply(usage=SMALL_USAGE, cut_after_events=2),
        Reply(raw_body=b"\n\n{oops"),
    )
    seen: list[str] = []
    balance = LiveBook(SQLiteSource(ledger))
    try:
        async with (
            running_proxy(
                fake.base_url,
                book,
                sink=FanOut(writer, LogSink()),
                spend=store.spend,
                first_byte=2,
                balance=balance,
            ) as proxy,
            httpx.AsyncClient(base_url=proxy.url, headers=AUTH) as http,
        ):
            for body in (CHAT, STREAM, CHAT, CHAT, CHAT, CHAT, STREAM, CHAT):
                with contextlib.suppress(httpx.HTTPError):
                    response = await http.post("/chat/completions", json=body)
                    seen.append(str(response.headers) + response.text)
            for path in ("/models", "/v1/models", "/metrics", "/healthz", "/readyz", "/nope"):
                response = await http.get(path)
                seen.append(str(response.headers) + response.text)
            unauthorized = await http.post(
                "/chat/completions", json=CHAT, headers={"Authorization": "Bearer " + CANARY}
            )
            seen.append(unauthorized.text)
            await proxy.sink.wait_for(8)
            # DeepSeek's balance: read, refused (401 echoes the key's end), and malformed
            # around the key itself.
            poller = proxy.app[POLLER]
            assert await poller.poll_once() is Polled.STORED
            fake.balance_status = 401
            assert await poller.poll_once() is Polled.FAILED
            fake.balance_status = 200
            fake.balance_body = json.dumps(
                {"balance_infos": [{"currency": CANARY, "total_balance": CANARY}]}
            ).encode()
            assert await poller.poll_once() is Polled.FAILED
            seen.append((await http.get("/metrics")).text)
    finally:
        balance.close()
        writer.close()
    for text in seen:
        assert leaks(text) == [], text[:300]
    logged = "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records)
    assert "proxy.usage" in logged  # the DEBUG record lines were there to be checked
    assert "balance poll failed (http_error): DeepSeek answered HTTP 401" in logged
    assert "balance poll failed (bad_answer): currency '[redacted]'" in logged
    assert leaks(logged) == []
    for file in tmp_path.iterdir():  # the ledger, its WAL and shared-memory files
        assert CANARY.encode() not in file.read_bytes(), file
    with contextlib.closing(sqlite3.connect(ledger)) as conn:
        dump = "\n".join(conn.iterdump())
    assert leaks(dump) == []
    assert [r.headers["Authorization"] for r in fake.requests if "Authorization" in r.headers] == [
        f"Bearer {CANARY}"
    ] * len(fake.requests)


@pytest.fixture
async def trap() -> AsyncIterator[tuple[str, list[int]]]:
    """A server that must never be contacted; it counts connections."""
    hits: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append(1)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}", hits
    finally:
        server.close()
        await server.wait_closed()


async def test_ssrf_matrix_never_reaches_the_trap(
    fake: FakeDeepSeek, proxy: RunningProxy, trap: tuple[str, list[int]]
) -> None:
    target, hits = trap
    url = f"http://{target}"
    fake.enqueue(*[Reply(usage=SMALL_USAGE) for _ in range(6)], Reply(redirect_to=url + "/steal"))
    key = TEAM_KEYS["alpha"].encode()
    async with httpx.AsyncClient(base_url=proxy.url, headers=AUTH) as http:
        statuses = [
            (await http.post("/chat/completions", json={**CHAT, "api_base": url})).status_code,
            (await http.post("/chat/completions", json={**CHAT, "base_url": url})).status_code,
            (await http.post("/chat/completions", json=CHAT, headers={"Host": target})).status_code,
            (
                await http.post(
                    "/chat/completions",
                    json=CHAT,
                    headers={
                        "X-Forwarded-Host": target,
                        "X-Forwarded-Proto": "http",
                        "Forwarded": f"host={target}",
                    },
                )
            ).status_code,
            (
                await http.post(
                    "/v1/chat/completions", json={**CHAT, "extra_body": {"base_url": url}}
                )
            ).status_code,
            (await http.post("/beta/chat/completions", json=CHAT)).status_code,
            (await http.post("/chat/completions", json=CHAT)).status_code,  # redirect reply
        ]
        for path in (
            f"/{url}/chat/completions",
            f"//{target}/chat/completions",
            "/%2e%2e/chat/completions",
            "/chat/completions/..%2f..%2fsteal",
            "/chat/../chat/completions/%2e%2e",
            f"/chat/completions?url={url}",
        ):
            response = await http.post(path, json=CHAT)
            statuses.append(response.status_code)
        absolute = await raw_request(
            proxy.url,
            b"POST "
            + url.encode()
            + b"/chat/completions HTTP/1.1\r\nHost: "
            + target.encode()
            + b"\r\nAuthorization: Bearer "
            + key
            + b"\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        )
    assert statuses[:6] == [200] * 6
    assert statuses[6] == 502  # the redirect is not followed
    # "//host/path" is a network-path reference to aiohttp: it serves /chat/completions, and
    # the call still goes to the configured upstream, never to the host named in the path.
    assert statuses[7:] == [404, 200, 404, 404, 404, 200]
    assert absolute.split(b"\r\n", 1)[0].split(b" ")[1] in (b"400", b"404")
    assert hits == []
    assert {r.path for r in fake.requests} <= {"/chat/completions", "/beta/chat/completions"}


async def test_any_authorization_header_is_a_clean_401(
    fake: FakeDeepSeek, proxy: RunningProxy
) -> None:
    rng = random.Random(42208)  # noqa: S311 - reproducible fuzzing, not a secret
    alphabet = [chr(c) for c in range(0x20, 0x7F)] + ["\t", "é", "ÿ", "\x80"]
    nasty = [
        "' OR '1'='1",
        "Bearer ' OR 1=1 --",
        'Bearer "; DROP TABLE usage; --',
        "Bearer " + "A" * 900,
        "Bearer",
        "Bearer  ",
        "bearer sk-proxy-",
        "Basic Og==",
        "Bearer " + TEAM_KEYS["alpha"][:-1],
        "Bearer " + TEAM_KEYS["alpha"] + "x",
        "Bearer %00",
        "Bearer \\x00",
        "Bearer ${jndi:ldap://x}",
        "Token abc",
        "Bearer " + TEAM_KEYS["alpha"].upper(),
    ]
    nasty += ["".join(rng.choices(alphabet, k=rng.randint(1, 300))) for _ in range(300)]
    for value in nasty:
        # Raw bytes, so values an HTTP client library would refuse reach the proxy too.
        answer = await raw_request(
            proxy.url,
            b"POST /chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close"
            b"\r\nAuthorization: "
            + value.encode("latin-1")
            + b"\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        )
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401 "), (value, head[:40])
        assert json.loads(body)["error"]["code"] == "invalid_api_key"
        if len(value.strip()) > 6:
            assert value.strip().encode("latin-1") not in body
    assert fake.requests == []
    assert proxy.sink.records == []


async def test_non_utf8_upstream_data_is_harmless(fake: FakeDeepSeek, proxy: RunningProxy) -> None:
    fake.enqueue(
        Reply(raw_body=b'\xff\xfe\x00{"usage": \xc3\x28}'),
        Reply(raw_events=[b'data: \xff\xfe{"usage":{}}\n\n', b"data: [DONE]\n\n"]),
        Reply(status=500, error_body=b"\xff\xfe\xfd"),
    )
    async with httpx.AsyncClient(base_url=proxy.url, headers=AUTH) as http:
        body = await http.post("/chat/completions", json=CHAT)
        stream = await http.post("/chat/completions", json=STREAM)
        error = await http.post("/chat/completions", json=CHAT)
        records = await proxy.sink.wait_for(3)
    assert (body.status_code, stream.status_code, error.status_code) == (200, 200, 500)
    assert body.content.endswith(b"\xc3\x28}") and stream.content.endswith(b"[DONE]\n\n")
    assert error.content == b"\xff\xfe\xfd"
    assert [r.outcome for r in records] == ["bad_response", "complete", "upstream_error"]
    for record in records:
        assert all(cost >= 0 for cost in record.costs.values())
    assert len(fake.requests) == 3  # one upstream attempt per call: the proxy never retries


SOURCES = sorted((ROOT / "proxy").rglob("*.py"))


def test_no_eval_exec_or_unsafe_yaml() -> None:
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"\b(eval|exec)\(", text), path
        assert "literal_eval" not in text, path
        for match in re.finditer(r"yaml\.(\w+)\(", text):
            assert match.group(1) in ("load", "safe_load"), (path, match.group(0))
            if match.group(1) == "load":
                assert path.name == "yamlfile.py", path
    import yaml

    from proxy.yamlfile import _StrictLoader

    assert issubclass(_StrictLoader, yaml.SafeLoader)


# SQL text may be assembled only from these reviewed pieces: `keys`, the expressions of a fixed
# mapping (`proxy.ledger.report_groups.GROUPS`: a key naming a tag passes it as a parameter),
# `positions`, their numbers (``1, 2``), constant column and aggregate lists, `reprice`'s
# constant condition, `TimeRange.where()`, which yields constant clauses with `?` placeholders
# (and the report's ``AND team = ?``), `marks`, a run of `?` placeholders
# (`proxy.ledger.rows.settled_ids`), and `money`, the ledger's exact sums of money columns
# (`Queries.money_sum`: a constant per database). Everything else is a parameter.
REVIEWED_INTERPOLATIONS = {
    "keys",
    "positions",
    "', '.join(_COUNT_SQL)",
    "where",
    "condition",
    "', '.join(RECORD_COLUMNS)",
    "marks",
    "money",
}


def _calls(text: str, name: str) -> list[str]:
    """The argument text of every ``.name(...)`` call, matching parentheses."""
    calls = []
    for match in re.finditer(r"\." + name + r"\(", text):
        depth, end = 1, match.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
        calls.append(text[match.end() : end - 1])
    return calls


def test_sql_is_parameterised() -> None:
    """No SQL text is built from values: every value travels as a parameter."""
    checked = 0
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        for call in _calls(text, "execute") + _calls(text, "executemany"):
            sql = call.split('", ')[0]
            assert not re.search(r"[\"']\s*(%|\+|\.format)", sql), (path, call)
            if re.search(r"\bf[\"']", sql):
                for piece in re.findall(r"\{([^{}]+)\}", sql):
                    assert piece in REVIEWED_INTERPOLATIONS, (path, piece)
            checked += 1
    assert checked > 20
