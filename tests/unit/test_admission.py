"""Admission (`proxy.admission`): per-team and global limits, draining, and the limits held
across workers by `SharedAdmission`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from proxy.admission import Admission, SharedAdmission, TeamsChanged
from proxy.config import Limits
from proxy.errors import Draining, Overloaded

LIMITS = Limits(max_inflight=3, max_inflight_per_team=2)


def test_a_team_at_its_limit_is_refused_while_others_are_admitted() -> None:
    admission = Admission(LIMITS)
    admission.enter("alpha")
    admission.enter("alpha")
    with pytest.raises(Overloaded, match=r"^team 'alpha' has 2 calls in progress, its limit"):
        admission.enter("alpha")
    admission.enter("beta")
    assert admission.in_flight() == {"alpha": 2, "beta": 1}


def test_the_global_limit_holds_over_all_teams() -> None:
    admission = Admission(LIMITS)
    for team in ("alpha", "beta", "gamma"):
        admission.enter(team)
    with pytest.raises(Overloaded, match=r"^the proxy has 3 calls in progress, its limit"):
        admission.enter("delta")
    assert admission.in_flight() == {"alpha": 1, "beta": 1, "gamma": 1}


def test_a_call_that_leaves_frees_its_place() -> None:
    admission = Admission(LIMITS)
    admission.enter("alpha")
    admission.enter("alpha")
    admission.leave("alpha")
    admission.enter("alpha")
    admission.leave("alpha")
    admission.leave("alpha")
    assert admission.in_flight() == {"alpha": 0}


def test_a_refusal_is_a_503_that_keeps_the_connection() -> None:
    """Overload is brief: the client retries here. Draining sends it elsewhere."""
    assert (Overloaded.status, Overloaded.close_connection) == (503, False)
    assert (Draining.status, Draining.close_connection) == (503, True)


async def test_drain_with_nothing_in_flight_is_immediate_and_refuses_new_calls() -> None:
    admission = Admission(LIMITS)
    assert await admission.drain(within=0) is True
    with pytest.raises(Draining, match="shutting down"):
        admission.enter("alpha")
    with pytest.raises(Draining):
        admission.refuse_if_draining()
    assert admission.in_flight() == {}


async def test_drain_waits_for_the_last_call_to_leave() -> None:
    admission = Admission(LIMITS)
    admission.enter("alpha")
    admission.enter("beta")
    drained = asyncio.create_task(admission.drain(within=10))
    await asyncio.sleep(0)  # one turn of the loop: drain is now waiting
    assert not drained.done() and admission.draining
    admission.leave("alpha")
    await asyncio.sleep(0)
    assert not drained.done()
    admission.leave("beta")
    assert await drained is True


async def test_drain_gives_up_after_its_time() -> None:
    admission = Admission(LIMITS)
    admission.enter("alpha")
    assert await admission.drain(within=0.01) is False
    assert admission.in_flight() == {"alpha": 1}


def test_refuse_if_draining_passes_until_draining() -> None:
    admission = Admission(LIMITS)
    admission.refuse_if_draining()
    admission.draining = True
    with pytest.raises(Draining):
        admission.refuse_if_draining()


def test_shared_admission_holds_the_limits_over_every_worker(tmp_path: Path) -> None:
    """Two workers' `SharedAdmission` on one counters file (``serve --workers 2``): each counts
    in its own slot and checks the sums; a dead worker's zeroed slot frees its share."""
    limits = Limits(max_inflight=5, max_inflight_per_team=3)
    supervisor = SharedAdmission.create(tmp_path, 2, ("alpha", "beta"))
    one, two = (SharedAdmission.join(tmp_path, slot, limits, ("alpha", "beta")) for slot in (0, 1))
    one.enter("alpha")
    two.enter("alpha")
    one.enter("alpha")
    with pytest.raises(Overloaded, match="team 'alpha' has 3 calls in progress"):
        two.enter("alpha")
    two.enter("beta")
    two.enter("beta")
    with pytest.raises(Overloaded, match="the proxy's workers have 5 calls in progress"):
        one.enter("beta")
    two.leave("beta")
    one.enter("beta")
    assert (one.in_flight(), two.in_flight()) == ({"alpha": 2, "beta": 1}, {"alpha": 1, "beta": 1})
    supervisor.zero(0)  # the first worker died: its calls no longer count
    replacement = SharedAdmission.join(tmp_path, 0, limits, ("alpha", "beta"))
    replacement.enter("alpha")
    replacement.enter("alpha")
    assert (replacement.in_flight(), two.in_flight()) == ({"alpha": 2}, {"alpha": 1, "beta": 1})


def test_a_worker_with_other_teams_cannot_join(tmp_path: Path) -> None:
    """The configuration file was edited while the service ran: a replacement worker reading
    other teams would count into other teams' columns, so it refuses to start."""
    SharedAdmission.create(tmp_path, 2, ("alpha", "beta"))
    with pytest.raises(TeamsChanged, match="restart the service"):
        SharedAdmission.join(tmp_path, 1, Limits(), ("beta", "alpha"))


async def test_a_draining_worker_refuses_before_counting(tmp_path: Path) -> None:
    SharedAdmission.create(tmp_path, 2, ("alpha",))
    one, two = (SharedAdmission.join(tmp_path, slot, LIMITS, ("alpha",)) for slot in (0, 1))
    one.enter("alpha")
    assert await two.drain(within=0) is True
    with pytest.raises(Draining):
        two.enter("alpha")
    one.enter("alpha")  # the refused call took no share of the team's limit of 2
    assert (one.in_flight(), two.in_flight()) == ({"alpha": 2}, {})
