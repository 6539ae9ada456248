"""Errors the proxy itself answers with, and the one place that shapes them like OpenAI's.

    ProxyError                  status, OpenAI `type` and `code`, whether an SDK may retry
    ├── InvalidRequest               the request cannot be served as it is
    │   ├── BadRequest          400  the body is not a JSON object, or lacks what we need
    │   ├── ModelNotPriced      403  a team with a hard budget asked for a model without a price
    │   ├── NotFound            404  no such route (upstream is never asked)
    │   ├── RequestTimeout      408  the request body did not arrive in time
    │   ├── PayloadTooLarge     413  request body over the configured limit
    │   ├── UnsupportedEncoding 415  a compressed request body (never inflated)
    │   └── HeadersTooLarge     431  request headers over the configured limit
    ├── Unauthorized            401  missing or unknown client key
    ├── InternalError           500  a bug in the proxy; everything the call held is released
    ├── Overloaded              503  too many calls in progress
    │   └── Draining            503  shutting down (and the connection is closed after it)
    ├── BudgetExceeded          402  a hard budget would be passed (proxy.budgets)
    ├── BudgetUnavailable       503  budget state unreadable: fail closed (proxy.budgets)
    ├── LedgerUnavailable       503  the ledger cannot commit (hard budgets fail closed), or
    │                                its bounded queue is full (every call)
    └── UpstreamFailure              DeepSeek unreachable, or its answer not relayed whole
        ├── UpstreamUnavailable 502  could not connect to DeepSeek (nothing was sent)
        ├── UpstreamCut         502  the connection broke after the request was sent
        ├── UpstreamRedirect    502  DeepSeek answered with a redirect (never followed)
        ├── UpstreamBadResponse 502  DeepSeek's answer cannot be read (encoding, endless event)
        └── UpstreamTimeout     504  DeepSeek did not answer in time (it may have billed)

SDKs retry 5xx by default; `x-should-retry: false` is set where a retry could be billed twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from types import MappingProxyType

from aiohttp import web

from proxy.outcome import Failure


class ProxyError(Exception):
    status = 500
    error_type = "server_error"
    code: str | None = None
    retry: bool | None = None  # None: let the SDK decide by status
    details: Mapping[str, object] | None = None  # extra fields inside "error"
    retry_after: int | None = None  # seconds, sent as Retry-After
    headers: Mapping[str, str] | None = None  # more response headers
    close_connection = False  # answer, then close the connection (no keep-alive)

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(ProxyError):
    """The client's request cannot be served as it is (OpenAI's ``invalid_request_error``)."""

    error_type = "invalid_request_error"


class BadRequest(InvalidRequest):
    """The body is not a JSON object, or lacks what the proxy needs (``model``)."""

    status = 400
    code = "invalid_request"


class Unauthorized(ProxyError):
    """No client key, or one the configuration does not know."""

    status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class NotFound(InvalidRequest):
    """No such route: DeepSeek is never asked about paths the proxy does not serve."""

    status = 404
    code = "not_found"


class PayloadTooLarge(InvalidRequest):
    """The body is over ``limits.max_request_bytes``; sending it again cannot help."""

    status = 413
    code = "payload_too_large"
    retry = False


class ModelNotPriced(InvalidRequest):
    """A team with a hard budget asked for a model the price book cannot price: the call's
    worst case cannot be bounded, so it is refused. Not 402: nothing was spent, and a retry
    cannot succeed until the book knows the model."""

    status = 403
    code = "model_not_priced"
    retry = False


class RequestTimeout(InvalidRequest):
    """The body did not arrive within ``timeouts.client_body``."""

    status = 408
    code = "request_timeout"


class UnsupportedEncoding(InvalidRequest):
    """A compressed request body: refused before it is read, so it is never inflated."""

    status = 415
    code = "unsupported_content_encoding"
    retry = False
    headers = MappingProxyType({"Accept-Encoding": "identity"})  # RFC 9110 15.5.16


class InternalError(ProxyError):
    """An unexpected failure inside the proxy before the call's answer began. It is logged
    with its traceback; the client only learns the request id to quote."""

    status = 500
    error_type = "server_error"
    code = "internal_error"


class HeadersTooLarge(InvalidRequest):
    """The headers are over ``limits.max_header_bytes``."""

    status = 431
    code = "headers_too_large"
    retry = False


class Overloaded(ProxyError):
    """Too many calls in progress (globally or for the team), or the proxy is shutting down:
    refused at once rather than queued, with a hint when to come back."""

    status = 503
    error_type = "server_error"
    code = "overloaded"
    retry_after = 1


class Draining(Overloaded):
    """The proxy is shutting down: the client should go to another instance, so the
    connection is closed after this answer instead of being kept alive."""

    close_connection = True


class LedgerUnavailable(ProxyError):
    """The usage ledger cannot take the call's record: for a team with a hard budget, because
    it cannot commit (the spend would not count against the budget: fail closed); for every
    team, because the records already waiting fill its bounded queue. Nothing was sent to
    DeepSeek, so a retry is safe; the ledger recovers on its own once it can write again (a
    full disk freed), or after a restart (its file deleted), hence the longer hint."""

    status = 503
    error_type = "server_error"
    code = "ledger_unavailable"
    retry_after = 5


class UpstreamFailure(ProxyError):
    """DeepSeek could not be reached or its answer not relayed whole: `failure` names the kind
    for the call's outcome (`proxy.outcome`)."""

    error_type = "upstream_error"
    failure: Failure | None = None


class UpstreamUnavailable(UpstreamFailure):
    """No connection to DeepSeek could be made: nothing was sent, so a retry is safe."""

    status = 502
    code = "upstream_unavailable"
    failure = "unreachable"


class UpstreamCut(UpstreamFailure):
    """The connection broke after the request was sent, or DeepSeek's answer ended before it
    was whole: it may be working on (and billing) the call, so an SDK must not send it
    again."""

    status = 502
    code = "upstream_cut"
    retry = False
    failure = "cut"


class UpstreamRedirect(UpstreamFailure):
    """DeepSeek answered with a redirect: its status says how the call ended (no failure)."""

    status = 502
    code = "upstream_redirect"


class UpstreamBadResponse(UpstreamFailure):
    """DeepSeek's answer cannot be read (an encoding the proxy cannot undo, an event that never
    ends). It may have billed the call, so an SDK must not send it again."""

    status = 502
    code = "upstream_bad_response"
    retry = False
    failure = "unreadable"


class UpstreamTimeout(UpstreamFailure):
    """DeepSeek did not answer, or finish, in time: it may be working on (and billing) the
    call, so an SDK must not send it again."""

    status = 504
    code = "upstream_timeout"
    retry = False
    failure = "timeout"


def error_body(
    message: str, error_type: str, code: str | None, details: Mapping[str, object] | None = None
) -> bytes:
    error: dict[str, object] = {"message": message, "type": error_type, "param": None, "code": code}
    if details:
        error.update(details)
    return json.dumps({"error": error}, separators=(",", ":")).encode()


ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    431: "request_too_large",
    503: "overloaded_error",
    504: "timeout_error",
}
"""Anthropic's error ``type`` for each status the proxy answers with (``api_error`` for any
other): what the Anthropic SDKs map to their exception classes."""


def openai_error_body(error: ProxyError) -> bytes:
    return error_body(error.message, error.error_type, error.code, error.details)


def anthropic_error_body(error: ProxyError) -> bytes:
    """``{"type": "error", "error": {"type": ..., "message": ...}}``, as Anthropic's API
    answers; the proxy's own code rides along in the message's place of detail."""
    kind = ANTHROPIC_TYPES.get(error.status, "api_error")
    inner: dict[str, object] = {"type": kind, "message": error.message}
    if error.code:
        inner["code"] = error.code
    if error.details:
        inner.update(error.details)
    return json.dumps({"type": "error", "error": inner}, separators=(",", ":")).encode()


ErrorShape = Callable[[ProxyError], bytes]
"""How an API format writes the proxy's own errors."""


def error_response(error: ProxyError, shape: ErrorShape = openai_error_body) -> web.Response:
    headers = {}
    if error.retry is not None:
        headers["x-should-retry"] = "true" if error.retry else "false"
    if error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    if error.headers:
        headers.update(error.headers)
    response = web.Response(
        status=error.status,
        headers=headers,
        content_type="application/json",
        body=shape(error),
    )
    if error.close_connection:
        response.force_close()
    return response
