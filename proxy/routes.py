"""The proxy's routes besides the completions: what each answers, once `proxy.app._route` has
checked the headers and the client key (`CLIENT`) and with errors shaped by it.

Completions (chat, FIM, Anthropic Messages, Responses) are `proxy.relay`'s; these are the model
list, Anthropic's token counting, the spend API, the metrics and the health checks.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.auth import ClientKey
from proxy.relay.request import read_body, refuse_compressed
from proxy.spend import spend_of
from proxy.state import ProxyState
from proxy.upstream import refuse_redirect

CLIENT = web.RequestKey("client", ClientKey)
"""The client key `proxy.app._route` found, for handlers that act for its team."""


async def models(request: web.Request, state: ProxyState) -> web.StreamResponse:
    """DeepSeek's model list, relayed (its echo of the key masked)."""
    async with await state.upstream.send("GET", "/models", request.headers) as answer:
        refuse_redirect(answer)
        headers, body = await state.upstream.shown(answer)
        return web.Response(status=answer.status, headers=headers, body=body)


COUNT_TOKENS = "/anthropic/v1/messages/count_tokens"


async def count_tokens(request: web.Request, state: ProxyState) -> web.StreamResponse:
    """Anthropic's token counting, passed through and not metered: it generates nothing, so
    there is no usage to record and nothing DeepSeek bills. DeepSeek's Anthropic guide does
    not list it (2026-12); whatever DeepSeek answers (a count, or its own 404) is relayed, so
    an agent that asks learns the truth, and gets counts the day DeepSeek offers them. The
    body is bounded as a completion's is; the client's key never goes upstream. It is a call
    to DeepSeek like any other for admission: refused while draining, and counted against the
    in-flight limits (all teams and the team's), so it cannot be used to flood DeepSeek."""
    refuse_compressed(request)
    body = await read_body(
        request, state.config.limits.max_request_bytes, state.config.timeouts.client_body
    )
    team = request[CLIENT].team
    state.admission.enter(team)  # 503 while draining or at a limit
    try:
        async with await state.upstream.send("POST", COUNT_TOKENS, request.headers, body) as answer:
            refuse_redirect(answer)
            headers, shown = await state.upstream.shown(answer)
            return web.Response(status=answer.status, headers=headers, body=shown)
    finally:
        state.admission.leave(team)


async def spend(request: web.Request, state: ProxyState) -> web.StreamResponse:
    """The spend and budgets of the key's team, and only its (`proxy.spend`)."""
    answer = await spend_of(state, request[CLIENT].team)
    return web.json_response(answer, headers={"Cache-Control": "no-store"})


async def metrics(request: web.Request, state: ProxyState) -> web.StreamResponse:
    return web.Response(
        body=state.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def healthz(request: web.Request, state: ProxyState) -> web.StreamResponse:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request, state: ProxyState) -> web.StreamResponse:
    """Readiness: false while draining for a shutdown, so load balancers stop sending calls."""
    if state.admission.draining:
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ready"})
