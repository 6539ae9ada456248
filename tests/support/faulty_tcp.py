"""A fault-injecting TCP relay for tests: latency, cuts (FIN or RST), blackholes and refusals.

Why it exists: what the proxy does when DeepSeek misbehaves depends on what the *socket* does
(a reset is not a clean close, a cut inside the response headers is not a cut inside the body,
silence is neither), and those states only exist on a real connection. Toxiproxy is the usual
tool but cannot be installed here, so this relay covers the toxics the tests need, in-process:

    client (the proxy) --> FaultyTcp on 127.0.0.1:<port> --> target (the fake DeepSeek)

It also counts what went through (`connections`, `bytes_to_target`, `bytes_to_client`), which is
what makes "no retry" (one connection per call) and "backpressure, not buffering" (the target
could only send what the client side drained) measurable rather than assumed.

The `Fault` in force is captured by each connection when it is accepted; `set_fault(...,
live=True)` also swaps it on the connections already open (the next chunk each way sees it).
Everything is closed by `close()` (pytest runs with ``filterwarnings = error``: an unclosed
transport would fail the test that leaked it).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final, Literal

CutMode = Literal["fin", "rst"]

_READ_SIZE: Final = 1 << 16
# Before an RST cut, let the bytes already written leave the transport buffer (polled every
# millisecond, a second at most): abort() discards whatever is still queued, and the test wants
# exactly `cut_after` bytes to reach the client.
_FLUSH_POLLS: Final = 1000


@dataclass(frozen=True, slots=True)
class Fault:
    """What the relay does to a connection. The default relays faithfully."""

    latency: float = 0.0
    """Seconds slept before forwarding each chunk, in each direction."""
    cut_after: int | None = None
    """Bytes from the target relayed to the client before both sides are cut (0: cut at the
    target's first byte, after the request went through)."""
    cut_mode: CutMode = "fin"
    """``fin``: a clean close; ``rst``: SO_LINGER 0 and abort, so the peer sees a reset."""
    blackhole: bool = False
    """Accept and read, never forward nor answer (a live blackhole stops an open relay)."""
    refuse: bool = False
    """Close the listening socket: new connections are refused (and cannot be counted)."""


@dataclass(slots=True, eq=False)
class _Link:
    """One accepted connection and, unless blackholed, its connection to the target."""

    fault: Fault
    client: asyncio.StreamWriter
    target: asyncio.StreamWriter | None = None
    sent_to_client: int = 0
    cut: bool = False


class FaultyTcp:
    """The relay: `start()` it, point the client at `host`/`port`/`url`, `close()` it."""

    def __init__(self, target_host: str, target_port: int, fault: Fault | None = None) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.fault = fault or Fault()
        self.connections = 0
        """Connections accepted (refused ones never reach the relay)."""
        self.bytes_to_target = 0
        self.bytes_to_client = 0
        """Bytes forwarded each way: written and drained, i.e. accepted by the far side's socket
        (the kernel may still hold them; the far side's process may not have read them)."""
        self.cuts = 0
        self.host = "127.0.0.1"
        self.port = 0
        self._server: asyncio.Server | None = None
        self._stopped: list[asyncio.Server] = []
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` once started."""
        if not self.port:
            raise RuntimeError("FaultyTcp is not started")
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        """Listen on 127.0.0.1 on a free port (unless the fault refuses from the start)."""
        await self._listen()
        if self.fault.refuse:
            await self._unlisten()

    async def set_fault(self, fault: Fault, *, live: bool = False) -> None:
        """Apply `fault` to new connections and, if `live`, to the open ones too."""
        self.fault = fault
        if fault.refuse:
            await self._unlisten()
        elif self._server is None:
            await self._listen()
        if live:
            for link in self._links:
                link.fault = fault

    async def close(self) -> None:
        """Stop listening and close every connection, whatever state it is in."""
        self._closing = True
        await self._unlisten()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for server in self._stopped:
            await server.wait_closed()
        self._stopped.clear()

    # --- listening ---------------------------------------------------------------------------

    async def _listen(self) -> None:
        if self._server is not None:
            return
        # The same port after a refusal: the client's configured URL must keep working.
        self._server = await asyncio.start_server(self._accepted, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _unlisten(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()  # only the listening socket: open relays carry on
            self._stopped.append(server)

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback that starts a task of our own: asyncio would otherwise run a
        # coroutine callback as a task it does not hand back (and, on 3.11, log a spurious
        # error when that task is cancelled), and close() could not cancel it.
        self.connections += 1
        if self._closing:  # accepted just before the listener closed
            writer.transport.abort()
            return
        task = asyncio.create_task(
            self._serve(_Link(self.fault, writer), reader),
            name=f"faulty-tcp-{self.port}-{self.connections}",
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, link: _Link, reader: asyncio.StreamReader) -> None:
        """Relay one connection, then release its sockets whatever way the relay ended."""
        self._links.add(link)
        graceful = False
        try:
            await self._relay(link, reader)
            graceful = True
        except (ConnectionError, OSError):
            pass  # either side going away ends the relay; that is what the tests provoke
        finally:
            self._links.discard(link)
            for side in (link.client, link.target):
                if side is not None:
                    await _close(side, abort=not graceful)

    # --- relaying ----------------------------------------------------------------------------

    async def _relay(self, link: _Link, client_reader: asyncio.StreamReader) -> None:
        if link.fault.blackhole:
            await _discard(client_reader)
            return
        try:
            target_reader, link.target = await asyncio.open_connection(
                self.target_host, self.target_port
            )
        except OSError:
            _set_linger_zero(link.client)  # the target is down: the client sees a reset
            raise
        up = asyncio.create_task(
            self._pump_up(link, client_reader), name=f"faulty-tcp-up-{self.port}"
        )
        try:
            await self._pump_down(link, target_reader)
            if not link.cut:
                await up  # the target closed: let the request side end on its own
        finally:
            up.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await up

    async def _pump_up(self, link: _Link, reader: asyncio.StreamReader) -> None:
        """Client to target."""
        target = link.target
        assert target is not None
        while data := await reader.read(_READ_SIZE):
            if link.fault.latency:
                await asyncio.sleep(link.fault.latency)
            if link.fault.blackhole or link.cut:
                continue
            target.write(data)
            await target.drain()
            self.bytes_to_target += len(data)
        if not link.cut and target.can_write_eof():
            target.write_eof()

    async def _pump_down(self, link: _Link, reader: asyncio.StreamReader) -> None:
        """Target to client, where the cuts happen."""
        while data := await reader.read(_READ_SIZE):
            if link.fault.latency:
                await asyncio.sleep(link.fault.latency)
            fault = link.fault  # as it is now: a live change applies from this chunk on
            if fault.blackhole:
                continue
            if fault.cut_after is not None:
                data = data[: max(fault.cut_after - link.sent_to_client, 0)]
            if data:
                link.client.write(data)
                await link.client.drain()
                link.sent_to_client += len(data)
                self.bytes_to_client += len(data)
            if fault.cut_after is not None and link.sent_to_client >= fault.cut_after:
                await self._cut(link, fault.cut_mode)
                return
        if link.client.can_write_eof():
            link.client.write_eof()

    async def _cut(self, link: _Link, mode: CutMode) -> None:
        link.cut = True
        self.cuts += 1
        sides = [link.client] + ([link.target] if link.target is not None else [])
        if mode == "rst":
            transport = link.client.transport
            for _ in range(_FLUSH_POLLS):
                if not transport.get_write_buffer_size() or transport.is_closing():
                    break
                await asyncio.sleep(0.001)
            for side in sides:
                _set_linger_zero(side)
        for side in sides:
            await _close(side, abort=mode == "rst")


async def _discard(reader: asyncio.StreamReader) -> None:
    while await reader.read(_READ_SIZE):
        pass


def _set_linger_zero(writer: asyncio.StreamWriter) -> None:
    """Make the socket's close send RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _close(writer: asyncio.StreamWriter, *, abort: bool) -> None:
    """Close (flushing first) or abort (dropping the buffer); idempotent."""
    if abort:
        writer.transport.abort()
    else:
        writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


@contextlib.asynccontextmanager
async def faulty_tcp(
    target_host: str, target_port: int, fault: Fault | None = None
) -> AsyncIterator[FaultyTcp]:
    """A started `FaultyTcp` in front of ``target_host:target_port``, closed on exit."""
    relay = FaultyTcp(target_host, target_port, fault)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.close()
