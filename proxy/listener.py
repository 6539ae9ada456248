"""How the proxy listens: aiohttp's HTTP server with the proxy's own settings.

`ProxySite` is aiohttp's ``TCPSite`` with three differences, each closing a hole found by
attacking the proxy:

- **Request bodies are never inflated.** aiohttp's server inflates a ``Content-Encoding: gzip``
  body on the event loop as it arrives, before any handler runs (so before authentication) and
  with no bound on the result: four 1 MiB bodies that inflate to 1 GiB each stalled every other
  request for seconds. Here decompression is off, and `proxy.relay.request` refuses a compressed
  body (415) without reading it.
- **A malformed request is answered without quoting it.** aiohttp answers a request line or
  header it cannot parse (a control byte after a key, LF-only line endings, an over-long
  line) with a 400 whose body, and an ERROR log line whose traceback, quote the offending
  bytes, client key included. `_RequestHandler` answers with an OpenAI-shaped 400 (431 for
  over-long or too many header lines) that names only the kind of defect, and logs one WARNING
  line with the client's address and the same kind. An unexpected failure inside a handler
  gets an OpenAI-shaped 500 instead of aiohttp's plain-text page.
- **An address already in use is one line** (`ListenError`), not a traceback.

`make_runner` builds the runner with those settings; `serve` and the tests both use it, so the
tests run the server the proxy runs.
"""

from __future__ import annotations

import asyncio
import logging
import os

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proxy.config import ProxyConfig
from proxy.errors import BadRequest, HeadersTooLarge, InternalError, ProxyError, error_response

log = logging.getLogger("proxy.http")

CANCEL_GRACE = 1.0
"""Seconds aiohttp waits, after the drain, for handlers it cancels to finish (twice at most:
once before cancelling, once after)."""


class ListenError(Exception):
    """The proxy cannot listen on its address (in use, not available, not permitted)."""


def make_runner(app: web.Application, config: ProxyConfig) -> web.AppRunner:
    """The app's runner: no access log (records are the log), the client-header timeout as
    the keep-alive timeout (slowloris), and a short grace for handlers cancelled at exit (the
    drain itself is `proxy.serve`'s)."""
    return web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=CANCEL_GRACE,
        keepalive_timeout=config.timeouts.client_header,
    )


class ProxySite(web.BaseSite):
    """A TCP listener whose connections are served by `_RequestHandler`."""

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        *,
        reuse_port: bool,
        keepalive_timeout: float,
    ) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self._reuse_port = reuse_port
        self._keepalive_timeout = keepalive_timeout

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None, "the runner is set up before its site starts"
        loop = asyncio.get_running_loop()
        keepalive_timeout = self._keepalive_timeout

        def connection() -> RequestHandler:
            # access_log=None turns aiohttp's access log off (as AppRunner's access_log=None
            # does); its annotation says Logger only.
            return _RequestHandler(
                server,
                loop=loop,
                keepalive_timeout=keepalive_timeout,
                access_log=None,  # type: ignore[arg-type]
                auto_decompress=False,
            )

        try:
            self._server = await loop.create_server(
                connection,
                self._host,
                self._port,
                reuse_address=True,
                reuse_port=self._reuse_port or None,
            )
        except OSError as exc:
            # asyncio words it "error while attempting to bind on address (...): ..."
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ListenError(
                f"cannot listen on {self._host}:{self._port}: {reason[:1].lower()}{reason[1:]}"
            ) from exc


class _RequestHandler(RequestHandler):
    """aiohttp's connection handler, answering errors in the proxy's own way."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        error: ProxyError
        if isinstance(exc, HttpProcessingError):
            defect = _defect(exc)
            # As aiohttp does: a bad method on a connection's first request is mostly a port
            # scanner or TLS spoken to a plain port, not worth a warning each time.
            scan = isinstance(exc, BadHttpMethod) and self._request_count == 1
            log.log(
                logging.DEBUG if scan else logging.WARNING,
                "malformed HTTP request from %s: %s",
                request.remote,
                defect,
            )
            if request.writer.output_size > 0:  # as aiohttp: an answer already began
                raise ConnectionError("a response was already sent")
            too_large = isinstance(exc, LineTooLong) or defect == "too many header lines"
            error = (HeadersTooLarge if too_large else BadRequest)(
                f"malformed HTTP request: {defect}"
            )
        else:
            super().handle_error(request, status, exc, message)  # logs it (and raises if an
            error = InternalError(
                "the proxy failed while handling this request; "  # answer
                "the failure is logged"
            )  # began)
            if status >= 500:
                error.status = status  # aiohttp's choice, as 504 for a handler's timeout
        response = error_response(error)
        response.force_close()
        return response


_DEFECTS = (
    # (words aiohttp's message contains, what the proxy says): only the right-hand side is
    # ever shown, so nothing of the request can reach a log line or a reply.
    ("too many headers", "too many header lines"),
    ("header value char", "a header value holds a control character"),
    ("header name char", "a header name holds an invalid character"),
    ("expected crlf", "a line does not end in CRLF"),
    ("bad status line", "the request line is not valid"),
    ("invalid method", "the request method is not valid"),
    ("chunk", "the chunked body is malformed"),
    ("content-length", "the Content-Length header is not valid"),
)


def _defect(exc: HttpProcessingError) -> str:
    """What was wrong, in words that quote nothing of the request (its message does)."""
    if isinstance(exc, LineTooLong):
        return "a request or header line is too long"
    text = (exc.message or "").lower()
    for needle, words in _DEFECTS:
        if needle in text:
            return words
    return f"the request is not valid HTTP/1.1 ({type(exc).__name__})"
