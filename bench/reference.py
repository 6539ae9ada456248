"""The reference forwarder: ``python -m bench.reference --port P --upstream URL``.

The proxy's throughput and latency targets are ratios against this: the least an aiohttp
server can do to relay a call (read the body, send it upstream on one shared `ClientSession`,
relay the answer chunk by chunk as it arrives). No JSON parsing, no auth, no metering, no
ledger, so the gap between it and the proxy is the price of metering, not of aiohttp. It uses
the same client settings as the proxy (`proxy.app`: unlimited pool, no User-Agent, no
decompression, no redirects) so that the two differ only in what the proxy adds.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
_REQUEST_DROP = _HOP_BY_HOP | {"host", "content-length"}
_RESPONSE_DROP = _HOP_BY_HOP | {"content-length", "content-encoding", "server", "date"}


async def forward(request: web.Request) -> web.StreamResponse:
    """Relay one POST to the same path upstream and stream the answer back unparsed."""
    body = await request.read()
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _REQUEST_DROP}
    async with request.app[SESSION].post(
        request.app[UPSTREAM] + request.path,
        data=body,
        headers=headers,
        allow_redirects=False,
        auto_decompress=False,
    ) as upstream:
        response = web.StreamResponse(
            status=upstream.status,
            headers={k: v for k, v in upstream.headers.items() if k.lower() not in _RESPONSE_DROP},
        )
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        except ConnectionError:  # the client left (wrk closes its sockets mid-call at the end)
            pass
        return response


async def healthz(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


def create_app(upstream: str) -> web.Application:
    """The forwarder; its client session opens and closes with the app."""
    app = web.Application(client_max_size=16 * 2**20)
    app[UPSTREAM] = upstream.rstrip("/")

    async def session(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            skip_auto_headers=("User-Agent",),
            timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_read=120),
        )
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/{path:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9000")
    parser.add_argument(
        "--like-proxy",
        action="store_true",
        help="run on uvloop with the proxy's garbage-collector settings (not "
        "what bench.run measures: for telling those two gains apart)",
    )
    args = parser.parse_args()
    app = create_app(args.upstream)
    loop = None
    if args.like_proxy:
        import uvloop  # noqa: PLC0415 - only for this option

        from proxy.serve import tune_garbage_collection  # noqa: PLC0415

        loop = uvloop.new_event_loop()

        async def tuned(app: web.Application) -> None:
            tune_garbage_collection()

        app.on_startup.append(tuned)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None, loop=loop)


if __name__ == "__main__":
    main()
