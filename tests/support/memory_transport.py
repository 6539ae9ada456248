"""The fake DeepSeek without a socket: a `proxy.upstream.Transport` that answers in memory.

httpx's ``MockTransport`` idea: the proxy's one seam to DeepSeek is `Transport.send`, so tests of
the relay, its metering and its failures can plug this in and skip the upstream server, its port
and its connection handling. The answers are the fake's own (`FakeDeepSeek.answer` plans every
write), so a reply queued on the fake comes back byte for byte as the loopback server would send
it, with the same pacing; a planned cut raises `UpstreamCut` where the real transport would, and
a pause longer than the proxy's idle timeout raises `UpstreamTimeout` as aiohttp's read timeout
does. What this cannot show (TCP framing, keep-alive reuse, half-closed sockets) stays with the
loopback tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import UpstreamCut, UpstreamTimeout
from proxy.upstream import UpstreamAnswer
from tests.support.fake_deepseek import FakeDeepSeek
from tests.support.fake_plans import PlannedAnswer, Write


class MemoryTransport:
    """Sends every request to `fake` in memory; `idle` is the proxy's ``timeouts.idle``."""

    def __init__(self, fake: FakeDeepSeek, idle: float = 300.0) -> None:
        self.fake = fake
        self.idle = idle
        self.urls: list[str] = []
        self.closed = False

    async def send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None
    ) -> UpstreamAnswer:
        self.urls.append(url)
        path = "/" + url.split("://", 1)[-1].partition("/")[2]
        planned = self.fake.answer(method, path, headers, body or b"")
        answer_headers = CIMultiDict(planned.headers)
        if planned.whole is not None:
            answer_headers["Content-Length"] = str(len(planned.whole))
        else:
            answer_headers["Transfer-Encoding"] = "chunked"
        return UpstreamAnswer(
            planned.status, CIMultiDictProxy(answer_headers), _PlannedBody(self, planned)
        )

    async def close(self) -> None:
        self.closed = True


class _PlannedBody:
    """A planned answer's writes as body chunks (`proxy.upstream.answer.Body`)."""

    def __init__(self, transport: MemoryTransport, planned: PlannedAnswer) -> None:
        self._transport = transport
        self._planned = planned
        self._writes = (
            [*planned.writes, Write(0.0, planned.whole)] if planned.whole else planned.writes
        )
        self._index = 0
        self._ended = False

    def __aiter__(self) -> _PlannedBody:
        return self

    async def __anext__(self) -> bytes:
        planned, fake = self._planned, self._transport.fake
        if self._index == planned.cut_at:
            self._end(fake.cut)
            raise UpstreamCut("the connection to DeepSeek broke in the middle of it")
        if self._index >= len(self._writes):
            self._end(fake.finished)
            raise StopAsyncIteration
        write = self._writes[self._index]
        self._index += 1
        if write.delay > self._transport.idle:
            await asyncio.sleep(self._transport.idle)  # the fake's pacing, not a test's wait
            self._end(fake.disconnects)
            raise UpstreamTimeout("DeepSeek went silent in the middle of its answer")
        if write.delay:
            await asyncio.sleep(write.delay)
        return write.data

    def _end(self, outcome: list[str]) -> None:
        if not self._ended:
            self._ended = True
            outcome.append(self._planned.record.id)

    async def close(self) -> None:
        """The proxy gave the connection back: before the end, the fake saw a disconnect."""
        self._end(self._transport.fake.disconnects)
