"""Size limits, slow clients and overload: refused at once, nothing sent to DeepSeek."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx

from proxy.app import ADMISSION
from proxy.config import Limits
from tests.support.fake_deepseek import FakeDeepSeek
from tests.support.fake_deepseek_shapes import Reply
from tests.support.proxy_harness import TEAM_KEYS, RunningProxy, StartProxy
from tests.support.requests import AUTH, BETA_AUTH, STREAM


async def test_oversized_headers_get_431(fake: FakeDeepSeek, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(limits=Limits(max_header_bytes=4096))
    async with httpx.AsyncClient(base_url=proxy.url, headers=AUTH) as http:
        response = await http.post(
            "/chat/completions", json=STREAM, headers={"X-Padding": "x" * 5000}
        )
        fine = await http.post("/chat/completions", json=STREAM, headers={"X-Padding": "x" * 100})
    assert response.status_code == 431
    assert response.json()["error"]["code"] == "headers_too_large"
    assert fine.status_code == 200
    assert len(fake.requests) == 1


async def _raw(port: int, data: bytes, *, pace: float = 0.0) -> tuple[bytes, float]:
    """Send `data` (byte by byte when paced) and read until the server closes."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i in range(len(data)):
            if pace:
                writer.write(data[i : i + 1])
                await writer.drain()
                await asyncio.sleep(pace)  # the slow client's own pacing, not a wait
            else:
                writer.write(data)
                break
        answer = await asyncio.wait_for(reader.read(), timeout=10)
    except ConnectionError:
        answer = b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return answer, time.monotonic() - started


async def test_slowloris_headers_are_cut_off(fake: FakeDeepSeek, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(client_header=0.5)
    port = int(proxy.url.rsplit(":", 1)[1])
    request = (
        b"POST /chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + TEAM_KEYS["alpha"].encode()
        + b"\r\n"
        + b"X-Slow: "
        + b"a" * 500
    )
    answer, elapsed = await _raw(port, request, pace=0.01)
    assert answer == b""  # closed, never answered
    assert elapsed < 3  # well before the 5 s it would take to send everything
    assert fake.requests == []


async def test_slow_body_gets_408(fake: FakeDeepSeek, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(client_body=0.3)
    port = int(proxy.url.rsplit(":", 1)[1])
    head = (
        b"POST /chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        b"\r\nContent-Length: 1000\r\nAuthorization: Bearer "
        + TEAM_KEYS["alpha"].encode()
        + b"\r\n\r\n{"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    status = await asyncio.wait_for(reader.readline(), timeout=10)
    writer.close()
    await writer.wait_closed()
    assert status.startswith(b"HTTP/1.1 408")
    assert fake.requests == []


async def test_overload_is_refused_fast_per_team_and_globally(
    fake: FakeDeepSeek, start_proxy: StartProxy
) -> None:
    fake.enqueue(
        *[Reply(content=[str(i) for i in range(20)], chunk_interval=0.05) for _ in range(4)]
    )
    limits = Limits(max_inflight=3, max_inflight_per_team=2)
    proxy = await start_proxy(limits=limits)
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
        running = [
            asyncio.create_task(http.post("/chat/completions", json=STREAM, headers=AUTH))
            for _ in range(2)
        ]
        await fake.wait_for(lambda: len(fake.requests) == 2)
        started = time.monotonic()
        team_full = await http.post("/chat/completions", json=STREAM, headers=AUTH)
        beta_ok = asyncio.create_task(
            http.post("/chat/completions", json=STREAM, headers=BETA_AUTH)
        )
        await fake.wait_for(lambda: len(fake.requests) == 3)
        all_full = await http.post("/chat/completions", json=STREAM, headers=BETA_AUTH)
        refused_in = time.monotonic() - started
        done = await asyncio.gather(*running, beta_ok)
        after = await http.post("/chat/completions", json=STREAM, headers=AUTH)
    assert (team_full.status_code, all_full.status_code) == (503, 503)
    assert team_full.headers["Retry-After"] == "1"
    assert "team 'alpha' has 2 calls in progress" in team_full.json()["error"]["message"]
    assert "the proxy has 3 calls in progress" in all_full.json()["error"]["message"]
    assert refused_in < 1  # refused at once, not queued behind the running streams
    assert [r.status_code for r in done] == [200, 200, 200]
    assert after.status_code == 200
    assert len(fake.requests) == 4


async def test_draining_refuses_new_calls_and_reports_not_ready(
    fake: FakeDeepSeek, proxy: RunningProxy
) -> None:
    async with httpx.AsyncClient(base_url=proxy.url, headers=AUTH) as http:
        assert (await http.get("/readyz")).status_code == 200
        proxy.app[ADMISSION].draining = True
        ready = await http.get("/readyz")
        call = await http.post("/chat/completions", json=STREAM)
        health = await http.get("/healthz")
    assert ready.status_code == 503 and ready.json() == {"status": "draining"}
    assert call.status_code == 503 and call.headers["Retry-After"] == "1"
    assert call.headers["Connection"] == "close"  # go elsewhere: this instance is stopping
    assert health.status_code == 200
    assert fake.requests == []
