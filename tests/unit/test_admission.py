"""Admission (`proxy.admission`): per-team and global limits, draining, the limits held
across workers by `SharedAdmission`, and limits and teams changed by a live reload."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from proxy.admission import TEAMS_FILE, Admission, SharedAdmission, TeamsFull
from proxy.config import Limits
from proxy.errors import Draining, Overloaded

LIMITS = Limits(max_inflight=3, max_inflight_per_team=2)


def registered(folder: Path) -> list[str]:
    """The teams `TEAMS_FILE` names, in column order."""
    lines = (folder / TEAMS_FILE).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[1:]]


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


def test_a_worker_started_after_the_teams_changed_registers_the_new_ones(tmp_path: Path) -> None:
    """The configuration file was edited while the service ran: a replacement worker reading
    other teams gives the new ones columns of their own, and counts the others where the
    running workers do."""
    SharedAdmission.create(tmp_path, 2, ("alpha", "beta"))
    running = SharedAdmission.join(tmp_path, 0, LIMITS, ("alpha", "beta"))
    replacement = SharedAdmission.join(tmp_path, 1, LIMITS, ("gamma", "beta"))
    running.enter("beta")
    replacement.enter("beta")
    with pytest.raises(Overloaded, match="team 'beta' has 2 calls in progress"):
        replacement.enter("beta")
    replacement.enter("gamma")
    assert registered(tmp_path) == ["alpha", "beta", "gamma"]


async def test_a_draining_worker_refuses_before_counting(tmp_path: Path) -> None:
    SharedAdmission.create(tmp_path, 2, ("alpha",))
    one, two = (SharedAdmission.join(tmp_path, slot, LIMITS, ("alpha",)) for slot in (0, 1))
    one.enter("alpha")
    assert await two.drain(within=0) is True
    with pytest.raises(Draining):
        two.enter("alpha")
    one.enter("alpha")  # the refused call took no share of the team's limit of 2
    assert (one.in_flight(), two.in_flight()) == ({"alpha": 2}, {})


def test_changed_limits_apply_to_the_next_call_and_running_calls_stay_counted() -> None:
    admission = Admission(LIMITS)
    admission.enter("alpha")
    admission.enter("alpha")
    admission.update(Limits(max_inflight=3, max_inflight_per_team=1), ("alpha", "beta"))
    admission.leave("alpha")
    with pytest.raises(Overloaded, match="team 'alpha' has 1 calls in progress, its limit"):
        admission.enter("alpha")
    admission.update(Limits(max_inflight=1, max_inflight_per_team=3), ("alpha", "beta"))
    with pytest.raises(Overloaded, match="the proxy has 1 calls in progress, its limit"):
        admission.enter("beta")
    admission.update(Limits(max_inflight=4, max_inflight_per_team=3), ("alpha", "beta"))
    admission.enter("alpha")
    admission.enter("alpha")
    admission.enter("beta")
    assert admission.in_flight() == {"alpha": 3, "beta": 1}


def test_a_removed_teams_running_calls_leave_cleanly() -> None:
    admission = Admission(LIMITS)
    admission.enter("beta")
    admission.update(LIMITS, ("alpha",))
    admission.leave("beta")
    for team in ("alpha", "alpha", "gamma"):  # the whole global limit is free again
        admission.enter(team)
    assert admission.in_flight() == {"alpha": 2, "beta": 0, "gamma": 1}


def test_workers_apply_changed_limits_to_their_next_call(tmp_path: Path) -> None:
    """Each worker reloads on its own: one with a lower per-team limit refuses at once against
    the calls every worker has in progress, while one not yet reloaded admits by the old."""
    SharedAdmission.create(tmp_path, 2, ("alpha",))
    one, two = (SharedAdmission.join(tmp_path, slot, LIMITS, ("alpha",)) for slot in (0, 1))
    one.enter("alpha")
    one.update(Limits(max_inflight=3, max_inflight_per_team=1), ("alpha",))
    with pytest.raises(Overloaded, match="team 'alpha' has 1 calls in progress over"):
        one.enter("alpha")
    two.enter("alpha")
    one.leave("alpha")
    two.update(Limits(max_inflight=3, max_inflight_per_team=1), ("alpha",))
    with pytest.raises(Overloaded, match="team 'alpha' has 1 calls in progress over"):
        two.enter("alpha")
    assert (one.in_flight(), two.in_flight()) == ({"alpha": 0}, {"alpha": 1})


def test_a_team_added_by_a_reload_is_counted_at_once_in_every_worker(tmp_path: Path) -> None:
    SharedAdmission.create(tmp_path, 2, ("alpha",))
    one, two = (SharedAdmission.join(tmp_path, slot, LIMITS, ("alpha",)) for slot in (0, 1))
    one.update(LIMITS, ("alpha", "gamma"))
    one.enter("gamma")
    two.update(LIMITS, ("alpha", "gamma"))
    two.enter("gamma")
    with pytest.raises(Overloaded, match="team 'gamma' has 2 calls in progress over"):
        one.enter("gamma")
    one.enter("alpha")
    with pytest.raises(Overloaded, match="the proxy's workers have 3 calls in progress"):
        two.enter("alpha")
    assert (one.in_flight(), two.in_flight()) == ({"gamma": 1, "alpha": 1}, {"gamma": 1})


def test_a_removed_teams_running_call_leaves_every_workers_count(tmp_path: Path) -> None:
    SharedAdmission.create(tmp_path, 2, ("alpha", "beta"))
    one, two = (SharedAdmission.join(tmp_path, slot, LIMITS, ("alpha", "beta")) for slot in (0, 1))
    one.enter("beta")
    two.enter("beta")
    one.update(LIMITS, ("alpha",))
    two.update(LIMITS, ("alpha",))
    one.leave("beta")
    two.leave("beta")
    one.enter("alpha")
    two.enter("alpha")
    with pytest.raises(Overloaded, match="team 'alpha' has 2 calls in progress over"):
        one.enter("alpha")
    assert (one.in_flight(), two.in_flight()) == ({"alpha": 1, "beta": 0}, {"alpha": 1, "beta": 0})


@pytest.mark.parametrize("first", [0, 1])
def test_workers_adding_different_teams_in_any_order_agree_on_the_columns(
    tmp_path: Path, first: int
) -> None:
    """Two workers reload configurations that add teams in other orders (the file changed
    again between their reloads): whichever goes first, each team has one column, so its
    limit holds across both."""
    limits = Limits(max_inflight=10, max_inflight_per_team=2)
    SharedAdmission.create(tmp_path, 2, ("alpha",))
    workers = [SharedAdmission.join(tmp_path, slot, limits, ("alpha",)) for slot in (0, 1)]
    teams = [("alpha", "gamma", "delta"), ("delta", "epsilon", "alpha", "gamma")]
    for index in (first, 1 - first):
        workers[index].update(limits, teams[index])
    workers[0].update(limits, ("epsilon",))  # a later reload: only epsilon is configured
    for team in ("gamma", "delta", "epsilon"):
        workers[0].enter(team)
        workers[1].enter(team)
        with pytest.raises(Overloaded, match=f"team '{team}' has 2 calls in progress over"):
            workers[first].enter(team)
    orders = [["alpha", "gamma", "delta", "epsilon"], ["alpha", "delta", "epsilon", "gamma"]]
    assert registered(tmp_path) == orders[first]


def test_teams_beyond_the_counters_capacity_are_refused_changing_nothing(tmp_path: Path) -> None:
    SharedAdmission.create(tmp_path, 2, ("alpha", "beta"), capacity=3)
    one = SharedAdmission.join(tmp_path, 0, LIMITS, ("alpha", "beta"))
    one.update(LIMITS, ("alpha", "gamma"))  # beta was removed, but keeps its column
    lower = Limits(max_inflight=1, max_inflight_per_team=1)
    with pytest.raises(
        TeamsFull,
        match=r"^no room for the new team\(s\) delta: .* hold 3 teams, "
        r"and 3 have been .*; restart the service to add more teams$",
    ):
        one.update(lower, ("alpha", "gamma", "delta"))
    one.enter("alpha")
    one.enter("alpha")  # the lower limits were not applied either
    with pytest.raises(TeamsFull, match="delta"):
        SharedAdmission.join(tmp_path, 1, LIMITS, ("delta",))
    with pytest.raises(TeamsFull, match=r"^4 teams are configured, but the workers' shared"):
        SharedAdmission.create(tmp_path / "new", 2, ("alpha", "beta", "gamma", "delta"), capacity=3)
    assert registered(tmp_path) == ["alpha", "beta", "gamma"]
