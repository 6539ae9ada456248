"""`proxy.outcome.classify`: every ending the relay can record, named in one table."""

from __future__ import annotations

import itertools
from typing import get_args

import pytest

from proxy.outcome import Failure, classify
from proxy.records import Outcome

ENDINGS: list[tuple[int | None, Failure | None, bool, Outcome]] = [
    # DeepSeek answered and the answer was relayed whole
    (200, None, False, "complete"),
    (200, None, True, "client_disconnected"),  # the client left; usage read on for the grace
    # DeepSeek refused: nothing to bill, whoever was listening
    (429, None, False, "upstream_error"),
    (500, None, True, "upstream_error"),
    (307, None, False, "upstream_error"),  # a redirect, refused
    # no answer at all
    (None, "unreachable", False, "connect_error"),
    (None, "timeout", False, "timeout"),
    (None, "cut", False, "upstream_cut"),
    (None, None, False, "connect_error"),  # never sent: nothing failed, nothing came
    # the answer began, then ended early
    (200, "timeout", False, "timeout"),
    (200, "cut", False, "upstream_cut"),
    (429, "timeout", False, "timeout"),  # its error body never came whole
    (200, "timeout", True, "client_disconnected"),  # the grace ran out
    (200, "cut", True, "client_disconnected"),
    # an answer that is not DeepSeek's JSON: DeepSeek's fault, listening or not
    (200, "unreadable", False, "bad_response"),
    (200, "unreadable", True, "bad_response"),
    # the proxy stopping: whatever else was recorded
    (200, "aborted", True, "aborted"),
    (None, "aborted", False, "aborted"),
]


@pytest.mark.parametrize(("status", "failure", "client_left", "outcome"), ENDINGS)
def test_each_ending_has_one_outcome(
    status: int | None, failure: Failure | None, client_left: bool, outcome: Outcome
) -> None:
    assert classify(status, failure, client_left) == outcome


def test_every_combination_is_classified_without_in_flight_or_interrupted() -> None:
    """Those two are the ledger's own states, never an ending the relay saw."""
    failures: list[Failure | None] = [
        None,
        "unreachable",
        "timeout",
        "cut",
        "unreadable",
        "aborted",
    ]
    seen = {
        classify(status, failure, left)
        for status, failure, left in itertools.product(
            [None, 200, 302, 404, 503], failures, [False, True]
        )
    }
    assert seen == set(get_args(Outcome)) - {"in_flight", "interrupted"}
