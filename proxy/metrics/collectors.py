"""Figures read when Prometheus scrapes rather than updated on the request path: calls in
progress, the ledger writer's state, spend from the ledger, budgets, holiday calendars running
out, the live configuration's reloads, and DeepSeek's balance and the bill's drift.

Each is a small custom `Collector` over a source it is given (a callable, a reader, the price
book), as prometheus_client recommends for values that already live elsewhere: reading them at
scrape time costs the request path nothing and is right after a restart. They are compared
by identity (``eq=False``): a registry keeps its collectors in a dictionary.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from proxy.config import Budget
from proxy.formats import ZERO, decimal_text
from proxy.ledger.store import SpendReader
from proxy.ledger.writer import LedgerStatus
from proxy.metrics.contract import (
    BALANCE,
    BALANCE_KINDS,
    BALANCE_LAST_POLL,
    BILL_COST_RUNNING,
    BILL_DRIFT,
    BILL_DRIFT_RATIO,
    BILL_DRIFT_RUNNING,
    BUDGET_THRESHOLD,
    CONFIG_INFO,
    CONFIG_LOADED,
    CONFIG_RELOADS,
    CONFIG_STALE,
    DIGEST_DIGITS,
    HOLIDAY_CALENDAR_MISSING,
    INFLIGHT,
    LEDGER_COMMITTING,
    LEDGER_LAST_COMMIT,
    LEDGER_MAX_QUEUED,
    LEDGER_QUEUED,
    LEDGER_WRITE_ERRORS,
    RELOAD_RESULTS,
    TEAM_BUDGET,
    TEAM_SPEND,
    Family,
)
from proxy.metrics.sources import ReloadStatus
from proxy.periods import PERIODS, period_start
from proxy.pricing import PriceBook
from proxy.pricing.engine import schedule_version_at, to_micros
from proxy.reconcile.book import Figures

log = logging.getLogger("proxy.metrics")


@dataclass(frozen=True, slots=True, eq=False)
class InflightCollector(Collector):
    """`llm_inflight_requests` read from the admission counts: the request path does no gauge
    updates."""

    teams: Sequence[str]
    in_flight: Callable[[], Mapping[str, int]]

    def collect(self) -> Iterator[Metric]:
        counts = self.in_flight()
        gauge = INFLIGHT.gauge()
        for team in self.teams:
            gauge.add_metric([team], float(counts.get(team, 0)))
        yield gauge


def ledger_values(status: LedgerStatus) -> dict[Family, float]:
    """The ``llm_ledger_*`` figures of one ledger writer."""
    return {
        LEDGER_COMMITTING: float(status.committing),
        LEDGER_QUEUED: float(status.waiting),
        LEDGER_MAX_QUEUED: float(status.capacity),
        LEDGER_WRITE_ERRORS: float(status.write_errors),
        LEDGER_LAST_COMMIT: status.last_commit,
    }


@dataclass(frozen=True, slots=True, eq=False)
class LedgerCollector(Collector):
    """The ``llm_ledger_*`` figures, read from the ledger's writer: the writer keeps them as
    plain attributes, so they cost the request path nothing."""

    status: Callable[[], LedgerStatus]

    def collect(self) -> Iterator[Metric]:
        for family, value in ledger_values(self.status()).items():
            metric = family.counter() if family.kind == "counter" else family.gauge()
            metric.add_metric([], value)
            yield metric


@dataclass(frozen=True, slots=True, eq=False)
class SpendCollector(Collector):
    """`llm_team_spend`: today's, this week's and this month's spend per team, from the
    ledger, so it is right after a restart.

    A ledger that cannot be read (a PostgreSQL server away) leaves the family out of that
    scrape rather than failing it: the rest of ``/metrics``, ``llm_ledger_committing`` first,
    is what says the ledger is in trouble."""

    spend: SpendReader
    teams: Sequence[str]
    currencies: Sequence[str]
    billing_timezone: ZoneInfo
    clock: Callable[[], datetime]

    def collect(self) -> Iterator[Metric]:
        today = self.clock().astimezone(self.billing_timezone).date()
        starts = {period: period_start(today, period) for period in PERIODS}
        totals = {
            (team, period, currency): ZERO
            for team in self.teams
            for period in PERIODS
            for currency in self.currencies
        }
        try:
            rows = self.spend(min(starts.values()), today)
        except Exception:
            log.exception("cannot read spend from the ledger for llm_team_spend")
            return
        for row in rows:
            for period, start in starts.items():
                key = (row.team, period, row.currency)
                if row.day >= start and key in totals:
                    totals[key] += row.amount
        gauge = TEAM_SPEND.gauge()
        for key, amount in totals.items():
            gauge.add_metric(list(key), float(amount))
        yield gauge


@dataclass(frozen=True, slots=True, eq=False)
class CalendarCollector(Collector):
    """`llm_holiday_calendar_missing`: 1 while a schedule's rule in force uses a holiday
    calendar that does not cover the current local year (its prices then follow the weekday
    rule and are flagged), so someone adds the new year's holidays before it matters. A
    calendar's `provisional` rule does not clear it: the days fixed by law are priced as
    holidays, but the bridging days only the published calendar gives are still missing."""

    book: PriceBook
    clock: Callable[[], datetime]

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        gauge = HOLIDAY_CALENDAR_MISSING.gauge()
        for name in sorted(self.book.schedules):
            rule = schedule_version_at(self.book, name, to_micros(now))
            missing = 0.0
            if rule is not None and rule.holiday_calendar is not None:
                year = now.astimezone(rule.timezone).year
                missing = float(year not in self.book.calendars[rule.holiday_calendar].years)
            gauge.add_metric([name], missing)
        yield gauge


@dataclass(frozen=True, slots=True, eq=False)
class BudgetCollector(Collector):
    """`llm_team_budget` and `llm_team_budget_threshold`: the budgets of the configuration
    this process runs, so a reload that drops a budget drops its series."""

    budgets: Sequence[Budget]

    def collect(self) -> Iterator[Metric]:
        budget = TEAM_BUDGET.gauge()
        threshold = BUDGET_THRESHOLD.gauge()
        for entry in self.budgets:
            labels = [entry.team, entry.period, entry.currency]
            budget.add_metric(labels, float(entry.amount))
            for percent in entry.soft:
                threshold.add_metric(
                    [*labels, decimal_text(percent)], float(entry.amount * percent / 100)
                )
        yield budget
        yield threshold


def reload_counts(status: ReloadStatus) -> dict[str, int]:
    """``llm_config_reload_total`` by `result`."""
    return dict(zip(RELOAD_RESULTS, (status.successes, status.failures), strict=True))


def digests(status: ReloadStatus) -> tuple[str, str]:
    """``llm_config_info``'s labels: the running config's and price book's digests, shortened."""
    return status.config_digest[:DIGEST_DIGITS], status.book_digest[:DIGEST_DIGITS]


@dataclass(frozen=True, slots=True, eq=False)
class ReloadCollector(Collector):
    """The ``llm_config_*`` figures of one process, read from its reloader: what runs, since
    when, and whether it is what is on disk."""

    status: Callable[[], ReloadStatus]

    def collect(self) -> Iterator[Metric]:
        status = self.status()
        reloads = CONFIG_RELOADS.counter()
        for result, count in reload_counts(status).items():
            reloads.add_metric([result], float(count))
        loaded = CONFIG_LOADED.gauge()
        loaded.add_metric([], status.loaded_at)
        info = CONFIG_INFO.gauge()
        info.add_metric(list(digests(status)), 1.0)
        stale = CONFIG_STALE.gauge()
        stale.add_metric([], float(status.stale))
        yield from (reloads, loaded, info, stale)


@dataclass(frozen=True, slots=True, eq=False)
class BalanceCollector(Collector):
    """DeepSeek's balance and the bill's drift (`proxy.reconcile`), read from the ledger at
    scrape time: whichever worker or replica answers, the figures are the shared ledger's.

    A ledger that cannot be read leaves the families out of that scrape, as `SpendCollector`
    does; a ledger that has no snapshot yet exports the families without series."""

    figures: Callable[[], Figures]

    def collect(self) -> Iterator[Metric]:
        try:
            figures = self.figures()
        except Exception:
            log.exception("cannot read DeepSeek's balance from the ledger")
            return
        balance = BALANCE.gauge()
        for snapshot in figures.balances:
            amounts = snapshot.balance
            for kind, amount in zip(
                BALANCE_KINDS, (amounts.total, amounts.granted, amounts.topped_up), strict=True
            ):
                balance.add_metric([amounts.currency, kind], float(amount))
        last_poll = BALANCE_LAST_POLL.gauge()
        if figures.last_poll is not None:
            last_poll.add_metric([], figures.last_poll.timestamp())
        drift = BILL_DRIFT.gauge()
        ratio = BILL_DRIFT_RATIO.gauge()
        running = BILL_DRIFT_RUNNING.gauge()
        cost = BILL_COST_RUNNING.gauge()
        for reconciled in figures.reconciled:
            window = reconciled.last
            if window is None:
                continue
            labels = [window.currency]
            drift.add_metric(labels, float(window.drift))
            if window.ratio is not None:
                ratio.add_metric(labels, float(window.ratio))
            running.add_metric(labels, float(reconciled.running.drift))
            cost.add_metric(labels, float(reconciled.running.ledger_cost))
        yield from (balance, last_poll, drift, ratio, running, cost)
