"""One completion call, from the client's request to its record: read, admit, exchange, record.

Everything that can refuse a request without cost (encoding, size, JSON, model, tags, end
user) comes before
admission (`proxy.relay.request`). The body goes upstream byte for byte, except that a
streaming request gets ``stream_options.include_usage = true`` (DeepSeek then reports usage on
every stream shape we know) and a budget policy may write ``max_tokens``. The exchange itself
(`proxy.relay.exchange`) records what happened; the record is built, priced and counted here,
exactly once, whatever ended the call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

from aiohttp import web

from proxy.attribution import TAGS_HEADER, AttributionError, end_user
from proxy.auth import ClientKey
from proxy.bounds import output_bound, prompt_bound
from proxy.budgets import BudgetExceeded, CallSize, Reservation
from proxy.dialects.registry import OPENAI_CHAT, Dialect
from proxy.errors import BadRequest, InternalError, LedgerUnavailable, ProxyError
from proxy.metering import CallMeter, build_record
from proxy.records import UsageRecord
from proxy.relay.exchange import Exchange
from proxy.relay.request import (
    new_request_id,
    parse_payload,
    read_body,
    refuse_compressed,
    rewrite,
    usage_option,
    wants_usage,
)

if TYPE_CHECKING:
    from proxy.state import ProxyState

log = logging.getLogger("proxy.relay")


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str
    """``chat``, ``fim``, ``messages`` or ``responses``: the label records and metrics use."""
    upstream_path: str
    dialect: Dialect = OPENAI_CHAT
    """The API format (`proxy.dialects.registry`)."""


async def proxy_completion(
    request: web.Request, state: ProxyState, client: ClientKey, endpoint: Endpoint
) -> web.StreamResponse:
    """Read, admit, exchange, record: one completion call.

    Everything that can refuse a request without cost (encoding, size, JSON, model) comes
    before admission. Every step after it (the in-flight slot, the budget hold, the ledger
    row) is undone in one ``finally``, whatever ends the call, a bug included: a request can
    never leave a slot or a hold behind.
    """
    started_at = state.clock()
    refuse_compressed(request)
    body = await read_body(
        request, state.config.limits.max_request_bytes, state.config.timeouts.client_body
    )
    tick = time.perf_counter()
    payload = parse_payload(body)
    try:
        lines = request.headers.getall(TAGS_HEADER, None)  # several lines are one list
        tags = state.config.attribution.read_tags(None if lines is None else ",".join(lines))
        user = end_user(payload)
    except AttributionError as exc:
        raise BadRequest(str(exc)) from None
    limits = state.config.limits
    dialect = endpoint.dialect
    output_field = dialect.output_field
    if dialect.asks_stream_usage:
        client_wants_usage = wants_usage(payload)
        changes = usage_option(payload)
    else:
        client_wants_usage, changes = True, {}
    default_max_tokens = state.config.policy(client.team).default_max_tokens
    if default_max_tokens is not None and payload.get(output_field) is None:
        changes[output_field] = default_max_tokens
    size = CallSize(
        prompt_bound(payload, len(body), limits),
        output_bound(changes if output_field in changes else payload, limits, output_field),
    )
    meter = CallMeter(
        request_id=new_request_id(),
        team=client.team,
        key_id=client.key_id,
        endpoint=endpoint.name,
        stream=payload.get("stream") is True,
        model_requested=payload["model"],
        tags=tags,
        end_user=user,
        payload=payload,
        started_at=started_at,
        prompt_bound=size.prompt,
        output_bound=size.output,
        price_book=state.pricer.book.digest,
        read_usage=dialect.reader(state.config),
    )
    _refuse_unrecordable(state, client.team)
    state.admission.enter(client.team)
    reservation: Reservation | None = None
    exchange: Exchange | None = None
    dispatched = False
    try:
        if state.budgets.applies(client.team):
            reservation = await _reserve(state, meter, size)
            if reservation.max_tokens is not None:
                changes[output_field] = meter.output_bound = reservation.max_tokens
        body = rewrite(body, payload, changes, normalise=_ambiguous(body, output_field))
        dispatched = True  # from here a sink may hold an in-flight row: a final one follows
        state.sink.dispatched(meter)
        exchange = Exchange(
            request, state, meter, client_wants_usage, changes.get(output_field), dialect
        )
        if reservation is not None:  # the spend API's header (issue 16)
            exchange.budget_remaining = reservation.remaining
        meter.overhead_seconds += time.perf_counter() - tick
        try:
            response = await exchange.run(endpoint.upstream_path, body)
        except asyncio.CancelledError:
            meter.failure = "aborted"
            raise
        meter.client_status = response.status
        await _send_now(request, response)  # a cancel here finds the call already over
        return response
    except (ProxyError, asyncio.CancelledError):
        raise
    except Exception as exc:
        if meter.upstream_status is not None and meter.failure is None:
            meter.failure = "cut"  # the answer was not seen whole: its usage is estimated
        if exchange is not None and exchange.answer_started:
            raise  # the answer is under way: aiohttp drops the connection, the client sees it
        meter.client_status = InternalError.status
        log.exception("request %s failed inside the proxy", meter.request_id)
        raise InternalError(
            f"the proxy failed while handling this call (request "
            f"{meter.request_id}); the failure is logged"
        ) from exc
    finally:
        state.admission.leave(client.team)
        record = _submit(state, meter) if dispatched else None
        if reservation is not None:
            await state.budgets.settle(reservation, _settlement(exchange, record))


def _refuse_unrecordable(state: ProxyState, team: str) -> None:
    """Refuse a call the proxy is about to stop serving or could not record. A draining proxy
    says so first (the client should go elsewhere). A record the ledger cannot keep is spend
    no one will see: with its bounded queue full, no call is admitted; while it cannot commit,
    no call that a hard budget must count."""
    state.admission.refuse_if_draining()
    if not state.ledger.has_room():
        raise LedgerUnavailable(
            "the usage ledger cannot record calls and the records waiting "
            "for it fill its queue: calls are refused until it recovers"
        )
    if not state.ledger.committing() and state.budgets.applies(team):
        raise LedgerUnavailable(
            f"the usage ledger cannot record calls: calls of team "
            f"{team!r}, which has a hard budget, are refused until it "
            "can, since their spend would not count"
        )


def _ambiguous(body: bytes, output_field: str) -> bool:
    """Whether the body may name ``model`` or ``max_tokens`` twice. JSON leaves duplicate keys
    to the parser: the proxy's keeps the last, another may keep the first and be billed for a
    model or a length the proxy never priced or reserved. Such a body (or one where the key
    names also occur deeper, in a tool schema say) is sent re-serialised from what the proxy
    read, so both sides read the same request."""
    return body.count(b'"model"') > 1 or body.count(b'"' + output_field.encode() + b'"') > 1


async def _reserve(state: ProxyState, meter: CallMeter, size: CallSize) -> Reservation:
    try:
        return await state.budgets.reserve(
            meter.team,
            meter.request_id,
            meter.model_requested,
            size,
            meter.started_at,
            meter.endpoint,
        )
    except BudgetExceeded:
        state.metrics.budget_refusals.labels(meter.team).inc()
        raise


def _settlement(exchange: Exchange | None, record: UsageRecord | None) -> dict[str, Decimal] | None:
    """What a reservation settles to: None if nothing is billable (the call never went out,
    or DeepSeek refused it); the record's costs otherwise (empty if no record could be built:
    nothing to count, as in the ledger)."""
    if exchange is None or (record is not None and not record.billable):
        return None
    return dict(record.costs) if record is not None else {}


async def _send_now(request: web.Request, response: web.StreamResponse) -> None:
    """Finish sending the response before the call is metered: the client need not wait while
    its record is built, priced and counted. aiohttp then finds the response already sent,
    and, as aiohttp does, a client that has gone is no error."""
    try:
        if not response.prepared:
            await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        pass


def _submit(state: ProxyState, meter: CallMeter) -> UsageRecord | None:
    tick = time.perf_counter()
    try:
        record = build_record(
            meter, state.clock(), state.pricer, state.config.price_at, state.config.limits
        )
        state.sink.submit(record)
        state.metrics.observe(record, meter.overhead_seconds + time.perf_counter() - tick)
    except Exception:  # a metering failure is logged loudly but never breaks the response
        log.exception("could not record usage of request %s", meter.request_id)
        return None
    return record
