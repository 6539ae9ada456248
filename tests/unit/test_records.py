"""The usage record's JSON form: `UsageRecord.from_json` is the exact inverse of `to_json`, so a
spilled record goes back into the ledger unchanged, money to the last digit."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.records import CallRequest, Outcome, UsageRecord, UsageSource

texts = st.text(max_size=20)
counts = st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1)
instants = st.datetimes(
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2100, 1, 1),
    timezones=st.sampled_from(
        [UTC, timezone(timedelta(hours=8)), timezone(timedelta(hours=-5, minutes=-30))]
    ),
)
money = st.dictionaries(
    st.sampled_from(["CNY", "USD", "EUR"]),
    st.decimals(
        min_value=Decimal("-1e6"), max_value=Decimal("1e6"), allow_nan=False, allow_infinity=False
    ),
)
records = st.builds(
    UsageRecord,
    request_id=texts,
    team=texts,
    key_id=texts,
    endpoint=texts,
    stream=st.booleans(),
    model_requested=texts,
    model_served=st.none() | texts,
    started_at=instants,
    first_byte_at=st.none() | instants,
    ended_at=instants,
    cache_hit_tokens=counts,
    cache_miss_tokens=counts,
    output_tokens=counts,
    reasoning_tokens=counts,
    prompt_tokens=counts,
    tool_calls=st.dictionaries(texts, st.integers(min_value=0, max_value=10**6)),
    upstream_status=counts,
    upstream_trace_id=st.none() | texts,
    outcome=st.sampled_from(get_args(Outcome)),
    usage_source=st.sampled_from(get_args(UsageSource)),
    priced=st.booleans(),
    unpriced_reason=st.none() | texts,
    billed_model=st.none() | texts,
    price_version=st.none() | texts,
    schedule_version=st.none() | texts,
    tier=st.none() | texts,
    priced_at=st.none() | instants,
    costs=money,
    cache_savings=money,
    price_book=texts,
    flags=st.lists(texts, max_size=4).map(tuple),
)


@given(records)
def test_from_json_is_the_exact_inverse_of_to_json(record: UsageRecord) -> None:
    line = json.dumps(record.to_json(), separators=(",", ":"))
    back = UsageRecord.from_json(json.loads(line))
    assert back == record
    assert all(
        type(amount) is Decimal  # money as exact decimals, never floats
        for amount in [*back.costs.values(), *back.cache_savings.values()]
    )
    assert json.dumps(back.to_json(), separators=(",", ":")) == line  # the same line again


def test_money_survives_the_round_trip_to_the_last_digit() -> None:
    record = UsageRecord.from_json(SAMPLE)
    assert record.costs == {"CNY": Decimal("0.0011456"), "USD": Decimal("0.00017184")}
    assert record.to_json()["costs"] == {"CNY": "0.0011456", "USD": "0.00017184"}
    assert record.started_at == datetime(2026, 11, 2, 1, 30, tzinfo=UTC)


SAMPLE: dict[str, Any] = {
    "request_id": "019a3f",
    "team": "alpha",
    "key_id": "k_00000000",
    "endpoint": "chat",
    "stream": True,
    "model_requested": "deepseek-flash",
    "model_served": "deepseek-v4-flash",
    "started_at": "2026-11-02T01:30:00Z",
    "first_byte_at": "2026-11-02T01:30:00.250000Z",
    "ended_at": "2026-11-02T01:30:02Z",
    "cache_hit_tokens": 640,
    "cache_miss_tokens": 360,
    "output_tokens": 50,
    "reasoning_tokens": 0,
    "prompt_tokens": 1000,
    "tool_calls": {"search": 1},
    "upstream_status": 200,
    "client_status": 200,
    "upstream_trace_id": "t",
    "outcome": "complete",
    "usage_source": "reported",
    "priced": True,
    "unpriced_reason": None,
    "billed_model": "deepseek-flash",
    "price_version": "v4",
    "schedule_version": "peak-3",
    "tier": "peak",
    "priced_at": "2026-11-02T01:30:00Z",
    "costs": {"CNY": "0.0011456", "USD": "0.00017184"},
    "cache_savings": {"CNY": "0.0012544", "USD": "0.00018816"},
    "price_book": "abc",
    "flags": ["usage_estimated"],
}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"costs": {"CNY": 0.0011456}}, "costs: unexpected value"),
        ({"costs": {"CNY": "1e"}}, "costs: not decimal amounts"),
        ({"costs": {"CNY": "NaN"}}, "costs: unexpected value"),
        ({"started_at": "2026-11-02T01:30:00"}, "started_at: '2026-11-02T01:30:00' has no UTC"),
        ({"ended_at": "yesterday"}, "Invalid isoformat string: 'yesterday'"),
        ({"ended_at": None}, "ended_at: unexpected value None"),
        ({"outcome": "fine"}, "outcome: unexpected value 'fine'"),
        ({"output_tokens": "50"}, "output_tokens: unexpected value '50'"),
        ({"output_tokens": True}, "output_tokens: unexpected value True"),
        ({"stream": 1}, "stream: unexpected value 1"),
        ({"tool_calls": {"search": "1"}}, "tool_calls: unexpected value"),
        ({"flags": "usage_estimated"}, "flags: unexpected value"),
        ({"team": None}, "team: unexpected value None"),
        ({"extra": 1}, "missing fields [], unknown fields ['extra']"),
    ],
)
def test_from_json_names_the_field_at_fault(change: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        UsageRecord.from_json({**SAMPLE, **change})


def test_from_json_names_missing_fields() -> None:
    data = {k: v for k, v in SAMPLE.items() if k not in ("team", "flags")}
    with pytest.raises(ValueError, match=r"missing fields \['team', 'flags'\]"):
        UsageRecord.from_json(data)


def test_old_spill_lines_with_trailing_zeros_read_back_exactly() -> None:
    """Spill files written before amounts lost their trailing zeros still read: the same
    amounts, written again without them."""
    record = UsageRecord.from_json(
        {**SAMPLE, "costs": {"CNY": "0.00114560"}, "cache_savings": {"CNY": "0.0012544000"}}
    )
    assert record.costs == {"CNY": Decimal("0.0011456")}
    assert record.to_json()["costs"] == {"CNY": "0.0011456"}
    assert record.to_json()["cache_savings"] == {"CNY": "0.0012544"}


def test_the_status_the_client_got_is_kept_as_recorded() -> None:
    """DeepSeek's 200 may have reached the client as the proxy's 502 (an answer it could not
    read): the record keeps what was sent, and a spill line from before the field existed
    reads as unknown."""
    record = UsageRecord.from_json({**SAMPLE, "upstream_status": 200, "client_status": 502})
    assert (record.upstream_status, record.client_status) == (200, 502)
    assert UsageRecord.from_json(record.to_json()) == record
    old = {name: value for name, value in SAMPLE.items() if name != "client_status"}
    assert UsageRecord.from_json(old).client_status is None


@pytest.mark.parametrize(
    ("usage_source", "billable"),
    [("reported", True), ("estimated", True), ("unknown", True), ("none", False)],
)
def test_only_calls_deepseek_refused_or_never_saw_are_not_billable(
    usage_source: UsageSource, billable: bool
) -> None:
    assert UsageRecord.from_json({**SAMPLE, "usage_source": usage_source}).billable is billable


def test_an_in_flight_record_has_the_call_and_nothing_else() -> None:
    call = CallRequest(
        "019a3f", "alpha", "k_00000000", "fim", True, "deepseek-flash", {"env": "prod"}, "u-7"
    )
    started = datetime(2026, 11, 2, 1, 30, tzinfo=UTC)
    record = UsageRecord.in_flight(call, started, "abc")
    assert record.to_json() == {
        "request_id": "019a3f",
        "team": "alpha",
        "key_id": "k_00000000",
        "endpoint": "fim",
        "stream": True,
        "model_requested": "deepseek-flash",
        "tags": {"env": "prod"},
        "end_user": "u-7",
        "model_served": None,
        "started_at": "2026-11-02T01:30:00Z",
        "first_byte_at": None,
        "ended_at": "2026-11-02T01:30:00Z",
        "cache_hit_tokens": None,
        "cache_miss_tokens": None,
        "output_tokens": None,
        "reasoning_tokens": None,
        "prompt_tokens": None,
        "tool_calls": {},
        "upstream_status": None,
        "client_status": None,
        "upstream_trace_id": None,
        "outcome": "in_flight",
        "usage_source": "unknown",
        "priced": False,
        "unpriced_reason": "in flight: the call had not ended",
        "billed_model": None,
        "price_version": None,
        "schedule_version": None,
        "tier": None,
        "priced_at": None,
        "costs": {},
        "cache_savings": {},
        "price_book": "abc",
        "flags": [],
    }
    assert record.in_flight_record() is record
