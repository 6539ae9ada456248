"""A client that reads a big stream very slowly: the proxy applies backpressure, it does not buffer.

    slow client (SO_RCVBUF 4 KiB) --> proxy --> FaultyTcp (counts bytes) --> fake DeepSeek

The fake streams ~22 MB as fast as it can while the client reads 64 bytes every 20 ms. If the
proxy buffered, it would read the whole stream from upstream at once; with backpressure, the
upstream can only send what the sockets between it and the client can hold, then stops.

The proxy runs in the test process, so its memory cannot be measured apart from the fake's and
the client's. What is measured instead, on Linux, is exact: of the bytes the relay handed to the
proxy, how many are still held *inside the proxy process* - neither in the kernel queues of the
proxy's two sockets (``/proc/net/tcp``) nor delivered to the client. That figure must stay put
and small (aiohttp's read buffer plus its write buffer, about 1 MB measured) while most of the
stream has not even left the fake.

Socket buffers are the kernel's and are large on loopback (send buffers autotune up to 4 MB each
side), which is why the stream is ~22 MB: a 2 MB stream would fit in them whole and prove
nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest

from proxy.bounds import TEMPLATE_TOKENS_PER_ITEM
from proxy.pricing import PriceBook, price
from proxy.records import UsageRecord
from proxy.usage import TokenUsage, estimate_tokens
from tests.support.fake_deepseek import FakeDeepSeek, running_fake
from tests.support.fake_deepseek_shapes import Reply
from tests.support.faulty_tcp import Fault, FaultyTcp, faulty_tcp
from tests.support.proxy_harness import PEAK, TEAM_KEYS, RunningProxy, running_proxy

PROMPT = "Write a very long answer"
PIECES = 20_000
PIECE = "x" * 1000  # ~1.2 kB per event, ~22 MB in all
SLOW_READ = 64  # bytes per read ...
READ_PAUSE = 0.02  # ... every 20 ms: ~3 kB/s
KERNEL_SLACK = 256 * 1024
HELD_BOUND = 2 * 1024 * 1024
PROC_NET_TCP = Path("/proc/net/tcp")
LINUX_ONLY = pytest.mark.skipif(
    sys.platform != "linux",
    reason="socket queues are read from /proc/net/tcp (Linux only; CI runs on Linux)",
)


@dataclass
class Setup:
    fake: FakeDeepSeek
    relay: FaultyTcp
    proxy: RunningProxy


@contextlib.asynccontextmanager
async def setup(book: PriceBook, grace: float) -> AsyncIterator[Setup]:
    async with running_fake() as fake:
        port = int(fake.base_url.rsplit(":", 1)[1])
        async with (
            faulty_tcp("127.0.0.1", port) as relay,
            running_proxy(relay.url, book, client_disconnect_grace=grace) as proxy,
        ):
            fake.enqueue(Reply(content=[PIECE] * PIECES, chunk_interval=0))
            yield Setup(fake, relay, proxy)


class SlowClient:
    """A raw socket with a 4 KiB receive buffer, reading a few bytes at a time."""

    def __init__(self, proxy_url: str) -> None:
        self.port = int(proxy_url.rsplit(":", 1)[1])
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect
        self.sock.setblocking(False)
        self.received = bytearray()

    async def send_request(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_connect(self.sock, ("127.0.0.1", self.port))
        body = json.dumps(
            {
                "model": "deepseek-flash",
                "stream": True,
                "messages": [{"role": "user", "content": PROMPT}],
            }
        ).encode()
        head = (
            f"POST /chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Authorization: Bearer {TEAM_KEYS['alpha']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        await loop.sock_sendall(self.sock, head.encode() + body)

    async def read_slowly(self, seconds: float) -> None:
        """Read `SLOW_READ` bytes every `READ_PAUSE` seconds (the client's pace, not a wait)."""
        loop = asyncio.get_running_loop()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            async with asyncio.timeout(5):
                data = await loop.sock_recv(self.sock, SLOW_READ)
            assert data, "the proxy closed the stream"
            self.received += data
            await asyncio.sleep(READ_PAUSE)

    def close(self) -> None:
        """Leave with unread data: the kernel resets the connection, as a killed client does."""
        self.sock.close()


def kernel_queues() -> dict[tuple[int, int], tuple[int, int]]:
    """(local port, remote port) -> (send queue, receive queue) of established IPv4 sockets."""
    table = {}
    for line in PROC_NET_TCP.read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] != "01":  # TCP_ESTABLISHED
            continue
        local, remote = (int(f.rsplit(":", 1)[1], 16) for f in fields[1:3])
        send, receive = (int(q, 16) for q in fields[4].split(":"))
        table[(local, remote)] = (send, receive)
    return table


def held_by_proxy(s: Setup, client: SlowClient) -> int:
    """Bytes the proxy read from upstream and has not yet handed to the kernel for the client.

    relay -> [relay's send queue] -> [proxy's upstream receive queue] -> PROXY -> [proxy's
    client send queue] -> [client's receive queue] -> read by the client. Upstream framing
    (chunk sizes) is counted on one side only: a few bytes per event, well inside the bound.
    """
    queues = kernel_queues()
    client_port = client.sock.getsockname()[1]
    [upstream_port] = [local for local, remote in queues if remote == s.relay.port]
    relay_send = queues[(s.relay.port, upstream_port)][0]
    proxy_upstream_receive = queues[(upstream_port, s.relay.port)][1]
    proxy_client_send = queues[(client.port, client_port)][0]
    client_receive = queues[(client_port, client.port)][1]
    return (
        s.relay.bytes_to_client
        - relay_send
        - proxy_upstream_receive
        - proxy_client_send
        - client_receive
        - len(client.received)
    )


async def wait_stalled(relay: FaultyTcp, quiet: float = 0.3, timeout: float = 10.0) -> int:
    """Wait until the upstream has stopped getting bytes through for `quiet` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            before = relay.bytes_to_client
            await asyncio.sleep(quiet)  # sampling a counter: the condition is "it did not move"
            if before and relay.bytes_to_client == before:
                return before


async def slow_phase(s: Setup, client: SlowClient) -> None:
    """Drive the slow read and check that upstream reading paused instead of buffering."""
    await client.send_request()
    await client.read_slowly(0.3)
    assert client.received.startswith(b"HTTP/1.1 200 ")
    stalled = await wait_stalled(s.relay)
    held_first = held_by_proxy(s, client)
    read_before = len(client.received)
    await client.read_slowly(1.5)
    read_during = len(client.received) - read_before
    moved = s.relay.bytes_to_client - stalled
    # The client read a few kB; upstream got no more through than that plus kernel slack ...
    assert 0 < read_during < 64 * 1024
    assert moved < read_during + KERNEL_SLACK
    # ... and most of the ~22 MB stream has not even left the fake.
    assert s.fake.finished == []
    assert s.relay.bytes_to_client < 14 * 1024 * 1024
    held_last = held_by_proxy(s, client)
    assert held_first < HELD_BOUND and held_last < HELD_BOUND
    assert abs(held_last - held_first) < KERNEL_SLACK  # not growing while the client dawdles


def estimated_costs(book: PriceBook, output: int) -> dict[str, Decimal]:
    usage = TokenUsage(cache_miss=estimate_tokens(PROMPT) + TEMPLATE_TOKENS_PER_ITEM, output=output)
    return {c: cost.total for c, cost in price(book, "deepseek-flash", usage, PEAK).costs.items()}


async def record_after_leaving(s: Setup, client: SlowClient) -> tuple[UsageRecord, float]:
    """Leave; the record, and how long after leaving it came."""
    client.close()
    left = time.monotonic()  # the proxy cannot notice before this: the loop has not run yet
    [record] = await s.proxy.sink.wait_for(1, timeout=15)
    return record, time.monotonic() - left


@LINUX_ONLY
async def test_slow_reader_gets_backpressure_then_usage_is_read_on(book: PriceBook) -> None:
    """Backpressure while the client is slow; once it leaves, the proxy reads the rest of the
    stream (well within the grace time) and records DeepSeek's real usage."""
    async with setup(book, grace=10.0) as s:
        client = SlowClient(s.proxy.url)
        try:
            await slow_phase(s, client)
            record, elapsed = await record_after_leaving(s, client)
        finally:
            client.close()
        await s.fake.wait_for(lambda: len(s.fake.finished) == 1)
        assert (s.relay.connections, len(s.fake.requests)) == (1, 1)
    assert elapsed < 10.0
    assert (record.outcome, record.usage_source) == ("client_disconnected", "reported")
    assert record.output_tokens == PIECES  # the fake reports one token per piece
    assert record.priced and all(cost > 0 for cost in record.costs.values())


@LINUX_ONLY
async def test_slow_reader_leaving_a_stalled_stream_is_recorded_at_the_grace(
    book: PriceBook,
) -> None:
    """If the rest of the stream does not come, the proxy stops reading after the grace time
    and records an estimate (one output token per event it read)."""
    grace = 1.0
    async with setup(book, grace=grace) as s:
        client = SlowClient(s.proxy.url)
        try:
            await slow_phase(s, client)
            await s.relay.set_fault(Fault(blackhole=True), live=True)  # upstream goes silent
            record, elapsed = await record_after_leaving(s, client)
        finally:
            client.close()
        assert (s.relay.connections, len(s.fake.requests)) == (1, 1)
    assert grace <= elapsed < grace + 1.0
    assert (record.outcome, record.usage_source) == ("client_disconnected", "estimated")
    assert record.output_tokens is not None and 0 < record.output_tokens < PIECES
    assert record.cache_miss_tokens == estimate_tokens(PROMPT) + TEMPLATE_TOKENS_PER_ITEM
    assert record.priced and dict(record.costs) == estimated_costs(book, record.output_tokens)
