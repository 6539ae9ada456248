"""The aiohttp application: routes, authentication, and error shaping.

Routes (the OpenAI SDK works with ``base_url`` ``http://host:port``, ``.../v1`` and ``.../beta``):

    POST /chat/completions, /v1/chat/completions   -> DeepSeek /chat/completions
    POST /beta/chat/completions                   -> DeepSeek /beta/chat/completions
    POST /beta/completions                        -> DeepSeek /beta/completions (FIM)
    POST /anthropic/v1/messages, /anthropic/messages -> DeepSeek /anthropic/v1/messages
    POST /anthropic/v1/messages/count_tokens      -> the same at DeepSeek, unmetered
    POST /responses, /v1/responses                -> DeepSeek /responses
    GET  /models, /v1/models                      -> DeepSeek /models
    GET  /spend, /v1/spend                        the key's team: spend and budgets (JSON)
    GET  /healthz, /readyz                        liveness, readiness (no key, no upstream)
    GET  /metrics                                 Prometheus text format, no key needed

Every other path is a 404 (another method on a known path, a 405) without touching DeepSeek.
All routes but ``/healthz``, ``/readyz`` and ``/metrics`` need a client key (Prometheus scrapes
without one: bind the proxy to a private interface or put the scrape path behind the network's
own access control). Errors are in OpenAI's shape, under ``/anthropic/`` in Anthropic's
(`_route`, `_completion`, `_unrouted`). The handlers of the routes other than completions are
in `proxy.routes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy import routes
from proxy.admission import Admission, TeamsFull
from proxy.auth import ClientKey, authenticate, lookup
from proxy.budgets import BudgetGuard, HoldStore, LedgerHolds, LocalHolds
from proxy.budgets.pg_holds import PostgresHolds
from proxy.config import DEFAULT_BALANCE_INTERVAL, ProxyConfig, check_references
from proxy.dialects.registry import ANTHROPIC, OPENAI_CHAT, RESPONSES, Dialect
from proxy.errors import (
    HeadersTooLarge,
    NotFound,
    ProxyError,
    Unauthorized,
    error_response,
)
from proxy.ledger.store import SpendReader, TeamSpendReader
from proxy.ledger.writer import LedgerStatus
from proxy.metrics import MetricSources, ProxyMetrics
from proxy.pricing import PriceBook, Pricer
from proxy.reconcile.live import LiveBook
from proxy.reconcile.poller import BalancePoller
from proxy.records import ALWAYS_HEALTHY, LedgerHealth, RecordSink
from proxy.relay import Endpoint, proxy_completion
from proxy.reload import Reloader, ReloadRefused
from proxy.routes import CLIENT
from proxy.state import Live, ProxyState
from proxy.upstream import AiohttpTransport, Transport, Upstream
from proxy.workers import new_owner

STATE = web.AppKey("live", Live)
RELOADER = web.AppKey("reloader", Reloader)
ADMISSION = web.AppKey("admission", Admission)
"""Also reachable before start-up completes, so `serve` can start draining on SIGTERM."""
POLLER = web.AppKey("balance_poller", BalancePoller)
"""This process's part in polling DeepSeek's balance, when the app has a `LiveBook`."""

_CHAT = Endpoint("chat", "/chat/completions")
_BETA_CHAT = Endpoint("chat", "/beta/chat/completions")
_FIM = Endpoint("fim", "/beta/completions")
_MESSAGES = Endpoint("messages", "/anthropic/v1/messages", ANTHROPIC)
_RESPONSES = Endpoint("responses", "/responses", RESPONSES)
ENDPOINTS = (_CHAT, _BETA_CHAT, _FIM, _MESSAGES, _RESPONSES)
"""Every metered route's endpoint; their names are the price book's `ENDPOINT_NAMES`."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _header_bytes(raw: tuple[tuple[bytes, bytes], ...]) -> int:
    """Size of the headers as sent (``name: value`` and CRLF each)."""
    total = 4 * len(raw)
    for name, value in raw:
        total += len(name) + len(value)
    return total


def _check_headers(request: web.Request, state: ProxyState) -> None:
    limit = state.config.limits.max_header_bytes
    if _header_bytes(request.raw_headers) > limit:
        raise HeadersTooLarge(f"request headers exceed {limit} bytes")


def _client(request: web.Request, state: ProxyState) -> ClientKey:
    client = authenticate(request.headers.get("Authorization"), state.config.keys)
    if client is None:
        raise Unauthorized(
            "missing or unknown API key; pass your proxy key as 'Authorization: Bearer <key>'"
        )
    return client


def _dialect_client(request: web.Request, state: ProxyState, dialect: Dialect) -> ClientKey:
    """The client key where the dialect's SDKs put it (Anthropic's: ``x-api-key``), else in
    ``Authorization: Bearer``; 401 if neither holds a known key."""
    if "x-api-key" in dialect.key_headers:
        client = lookup(request.headers.get("x-api-key"), state.config.keys)
        if client is not None:
            return client
    return _client(request, state)


def _route(
    handler: Callable[[web.Request, ProxyState], Awaitable[web.StreamResponse]],
    *,
    public: bool = False,
    dialect: Dialect = OPENAI_CHAT,
) -> Handler:
    """A route's handler with the checks every request gets: header size (431), the client
    key unless the route is public (401), and errors in the dialect's shape.

    Not an aiohttp middleware: a middleware adds two coroutine frames to every request (its
    own and aiohttp's ``_fix_request_current_app``), which the benchmark showed on the
    request path; unknown paths and methods get the same treatment from `_unrouted`.
    """

    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE].state
        try:
            _check_headers(request, state)
            if not public:
                request[CLIENT] = _dialect_client(request, state, dialect)
            return await handler(request, state)
        except ProxyError as exc:
            return error_response(exc, dialect.error_shape)

    return handle


def _completion(endpoint: Endpoint) -> Handler:
    """`_route`'s checks, written out: the completion routes carry nearly all the traffic, and
    going through `_route` would put one more coroutine frame on each call. The client's key
    comes where its API format puts it, and errors are in that format's shape."""
    dialect = endpoint.dialect
    shape = dialect.error_shape

    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE].state
        try:
            _check_headers(request, state)
            client = _dialect_client(request, state, dialect)
            return await proxy_completion(request, state, client, endpoint)
        except ProxyError as exc:
            return error_response(exc, shape)

    return handle


def _unrouted(routes: Mapping[str, frozenset[str]]) -> Handler:
    """Every request no route takes: 405 on a known path, else 404, in OpenAI's shape (under
    ``/anthropic/``, Anthropic's: the SDK there reads only that one)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        anthropic_path = request.path.startswith("/anthropic/")
        shape = ANTHROPIC.error_shape if anthropic_path else OPENAI_CHAT.error_shape
        try:
            _check_headers(request, request.app[STATE].state)
        except ProxyError as exc:
            return error_response(exc, shape)
        if request.path in routes:
            error = NotFound(f"{request.method} is not allowed on {request.path}")
            error.status = 405
            response = error_response(error, shape)
            response.headers["Allow"] = ", ".join(sorted(routes[request.path]))
            return response
        return error_response(NotFound(f"no route {request.method} {request.path}"), shape)

    return handle


def create_app(
    config: ProxyConfig,
    book: PriceBook,
    api_key: str,
    sink: RecordSink,
    *,
    registry: CollectorRegistry | None = None,
    spend: SpendReader | None = None,
    team_spend: TeamSpendReader | None = None,
    clock: Callable[[], datetime] = _utc_now,
    shared_metrics_dir: Path | None = None,
    shared_ledger: Path | None = None,
    shared_url: str | None = None,
    owner: str | None = None,
    admission: Admission | None = None,
    ledger: LedgerHealth | None = None,
    ledger_status: Callable[[], LedgerStatus] | None = None,
    transport: Transport | None = None,
    balance: LiveBook | None = None,
) -> web.Application:
    """Build the application; the upstream session opens and closes with it.

    `registry` receives every metric (a fresh one by default); `spend` reads daily spend from
    the ledger for `llm_team_spend` (omitted when there is no ledger), `team_spend` one team's,
    for the spend API (``GET /v1/spend`` answers 503 without it). With several workers
    (``serve --workers N``), `shared_metrics_dir` is the folder they share metrics through,
    `shared_ledger` the ledger that holds their hard-budget reservations (each marked with
    `owner`, this worker's id); `shared_url` a PostgreSQL ledger shared by replicas, which then
    holds the reservations of every replica (and worker) instead; `admission` counts calls
    across the workers
    (`proxy.admission.SharedAdmission`); by default it counts this process's own. `ledger`
    says whether the ledger can take records (None: always, as for a sink that cannot fail),
    and `ledger_status` gives its figures for the ``llm_ledger_*`` metrics (the ledger's
    writer provides both). `transport` carries requests to DeepSeek (aiohttp's by default; tests
    pass an in-memory one). `balance` is the ledger connection for DeepSeek's balance
    (`proxy.reconcile`): with it the app exports the balance and drift figures and has a
    poller (`POLLER`), which polls every ``reconcile.balance_interval`` seconds when that is
    set; tests call `BalancePoller.poll_once` themselves.
    """
    check_references(config, currencies=book.currencies, tools=book.tool_fees)
    app = web.Application(client_max_size=config.limits.max_request_bytes)
    registry = registry if registry is not None else CollectorRegistry()
    admission = admission if admission is not None else Admission(config.limits)
    app[ADMISSION] = admission

    def apply(new: ProxyConfig, new_book: PriceBook) -> None:
        """Swap a checked config and book in (`proxy.reload`): what may refuse goes first,
        then the new state is one assignment. Holds, counters, the upstream session and the
        ledger stay as they are."""
        state = live.state
        try:
            admission.update(new.limits, new.teams)
        except TeamsFull as exc:
            raise ReloadRefused(f"{new.path}: teams: {exc}") from exc
        new_pricer = Pricer(new_book)
        guard = BudgetGuard(
            new.budgets,
            new_pricer,
            holds,
            new.billing_timezone,
            new.policies,
            remaining_header=new.budget_remaining_header,
        )
        metrics.apply(
            dataclasses.replace(sources, teams=new.teams, book=new_book, budgets=new.budgets)
        )
        live.state = dataclasses.replace(state, config=new, pricer=new_pricer, budgets=guard)

    reloader = app[RELOADER] = Reloader(config, book, apply)
    sources = MetricSources(
        teams=config.teams,
        book=book,
        billing_timezone=config.billing_timezone,
        clock=clock,
        budgets=config.budgets,
        spend=spend,
        in_flight=admission.in_flight,
        ledger=ledger_status,
        reload=reloader.status,
        tag_labels=config.tag_labels,
        balance=balance.figures if balance is not None else None,
    )
    metrics = ProxyMetrics(registry, sources, shared_metrics_dir)
    pricer = Pricer(book)
    live = app[STATE] = Live()
    holds: HoldStore
    if shared_url is not None:
        holds = PostgresHolds(url=shared_url, owner=owner)
    elif shared_ledger is not None:
        holds = LedgerHolds(shared_ledger, owner=owner)
    else:
        holds = LocalHolds(spend)
    budgets = BudgetGuard(
        config.budgets,
        pricer,
        holds,
        config.billing_timezone,
        config.policies,
        remaining_header=config.budget_remaining_header,
    )

    async def budget_holds(app: web.Application) -> AsyncIterator[None]:
        await budgets.open()
        yield
        await live.state.budgets.close()  # the store is the same in every guard

    app.cleanup_ctx.append(budget_holds)

    async def upstream_session(app: web.Application) -> AsyncIterator[None]:
        upstream = Upstream(
            config.upstream_base_url,
            api_key,
            transport if transport is not None else AiohttpTransport(config.timeouts),
        )
        live.state = ProxyState(
            config=config,
            pricer=pricer,
            upstream=upstream,
            sink=sink,
            metrics=metrics,
            budgets=budgets,
            admission=admission,
            clock=clock,
            ledger=ledger or ALWAYS_HEALTHY,
            team_spend=team_spend,
        )
        yield
        await upstream.close()

    app.cleanup_ctx.append(upstream_session)

    if balance is not None:
        poller = app[POLLER] = BalancePoller(
            balance,
            lambda: live.state.upstream,
            clock,
            owner if owner is not None else new_owner("balance"),
            config.balance_interval or DEFAULT_BALANCE_INTERVAL,
            metrics.balance_poll_failed,
        )
        polls = config.balance_interval is not None

        async def polling(app: web.Application) -> AsyncIterator[None]:
            task = asyncio.create_task(poller.run(), name="balance-poller") if polls else None
            yield
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await poller.leave()

        app.cleanup_ctx.append(polling)  # after the upstream session: closed before it

    if config.reload_watch is not None:
        watch_interval = config.reload_watch

        async def watching(app: web.Application) -> AsyncIterator[None]:
            task = asyncio.create_task(reloader.watch(watch_interval))
            yield
            task.cancel()

        app.cleanup_ctx.append(watching)
    if metrics.sharing is not None:
        app.cleanup_ctx.append(metrics.sharing.publishing)
    app.router.add_post("/chat/completions", _completion(_CHAT))
    app.router.add_post("/v1/chat/completions", _completion(_CHAT))
    app.router.add_post("/beta/chat/completions", _completion(_BETA_CHAT))
    app.router.add_post("/beta/completions", _completion(_FIM))
    app.router.add_post("/anthropic/v1/messages", _completion(_MESSAGES))
    app.router.add_post("/anthropic/messages", _completion(_MESSAGES))
    count_tokens = _route(routes.count_tokens, dialect=ANTHROPIC)
    app.router.add_post(routes.COUNT_TOKENS, count_tokens)
    app.router.add_post("/anthropic/messages/count_tokens", count_tokens)
    app.router.add_post("/responses", _completion(_RESPONSES))
    app.router.add_post("/v1/responses", _completion(_RESPONSES))
    app.router.add_get("/models", _route(routes.models))
    app.router.add_get("/v1/models", _route(routes.models))
    app.router.add_get("/spend", _route(routes.spend))
    app.router.add_get("/v1/spend", _route(routes.spend))
    app.router.add_get("/healthz", _route(routes.healthz, public=True))
    app.router.add_get("/readyz", _route(routes.readyz, public=True))
    app.router.add_get("/metrics", _route(routes.metrics, public=True))
    methods: dict[str, set[str]] = {}
    for route in app.router.routes():
        methods.setdefault(route.resource.canonical, set()).add(route.method)  # type: ignore[union-attr]
    app.router.add_route(
        "*", "/{path:.*}", _unrouted({path: frozenset(verbs) for path, verbs in methods.items()})
    )
    return app
