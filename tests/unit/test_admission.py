"""Admission (`proxy.admission`): per-team and global limits, draining, and the limits held
across workers by `SharedAdmission`."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.admission import SharedAdmission, TeamsChanged
from proxy.config import Limits
from proxy.errors import Overloaded


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
