"""Live changes: the config file and the price book read again, checked whole, swapped at once.

A reload (SIGHUP, or the file watch when ``reload.watch`` is set) reads the config file and the
price book it names in a worker thread (the event loop keeps serving), checks them as start-up
does (`proxy.config.load_config`, `proxy.pricing.load_price_book`, `check_references`), and
only when everything passes hands them to the app's `Apply`, which builds the new request state
and swaps it in one assignment on the event loop (`proxy.app`). A call reads the state once,
when it starts: running calls finish with the config and prices they started with, new calls
use the new ones. Nothing that counts is rebuilt: metrics keep their counters, budget holds of
running calls stay held, the ledger and the connection pool to DeepSeek stay open.

What cannot change without a restart (`RESTART_ONLY`: where the proxy listens, the upstream
and its key's variable, the ledger and its writer's settings, the billing timezone, the
largest request body aiohttp accepts, the client-header timeout of the listening socket) is
kept as it runs, and the reload says so in a warning naming the keys; the files on disk then
differ from what runs, which ``llm_config_stale`` shows until a restart.

A config or book that fails a check is refused whole: the proxy keeps serving with the last
good one, logs the file, key and reason, and counts the failure (``llm_config_reload_total``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from proxy.config import ConfigError, ProxyConfig, check_references, load_config
from proxy.metrics import ReloadStatus
from proxy.pricing import PriceBook, PriceBookError, load_price_book

log = logging.getLogger("proxy.reload")

Apply = Callable[[ProxyConfig, PriceBook], None]
"""Swaps a checked config and book into the running app (on the event loop); raises
`ReloadRefused` if something the app holds cannot take them (e.g. no room for more teams)."""

RESTART_ONLY = (
    "host",
    "port",
    "upstream_base_url",
    "upstream_key_env",
    "ledger_path",
    "ledger_url",
    "flush_interval",
    "billing_timezone",
    "max_queued_records",
    "ledger_shutdown_timeout",
    "ledger_lease",
    "tag_labels",
    "balance_interval",
    "reconcile_currencies",
)
"""`ProxyConfig` fields a reload keeps as they run (the listening socket, the upstream
session, the ledger and its writer, the metric families are built once)."""
_RESTART_ONLY_LIMITS = ("max_request_bytes",)
_RESTART_ONLY_TIMEOUTS = ("client_header",)
STALE_CHECK_INTERVAL = 5.0
"""Seconds a fingerprint of the files on disk is reused (scrapes read it)."""


class ReloadRefused(Exception):
    """The new config or book cannot be applied; the message says which file, key and why."""


def fingerprint(config_path: Path, book_files: Iterable[Path]) -> str:
    """SHA-256 over the config file's bytes, the price book's files' bytes, and the names of
    the ``*.yaml`` files in the book's folders (a file added to a book folder changes the
    book). A file that cannot be read counts as its error."""
    digest = hashlib.sha256()
    files = [config_path, *book_files]
    folders = sorted({str(path.parent) for path in files[1:]})
    for path in files:
        digest.update(str(path).encode() + b"\0")
        try:
            digest.update(path.read_bytes())
        except OSError as exc:
            digest.update(f"unreadable: {exc.strerror}".encode())
    for folder in folders:
        names = sorted(p.name for p in Path(folder).glob("*.yaml"))
        digest.update(("\0".join(names) + "\0").encode())
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def restart_only_changes(running: ProxyConfig, new: ProxyConfig) -> list[str]:
    """The config keys that changed but need a restart, as the config file names them."""
    names = {
        "host": "listen.host",
        "port": "listen.port",
        "upstream_base_url": "upstream.base_url",
        "upstream_key_env": "upstream.api_key_env",
        "ledger_path": "ledger.path",
        "ledger_url": "ledger.url",
        "flush_interval": "ledger.flush_interval",
        "billing_timezone": "ledger.billing_timezone",
        "max_queued_records": "ledger.max_queued_records",
        "ledger_shutdown_timeout": "ledger.shutdown_timeout",
        "ledger_lease": "ledger.lease",
        "tag_labels": "attribution.metric_labels",
        "balance_interval": "reconcile.balance_interval",
        "reconcile_currencies": "reconcile.currencies",
    }
    changed = [names[f] for f in RESTART_ONLY if getattr(running, f) != getattr(new, f)]
    changed += [
        f"limits.{f}"
        for f in _RESTART_ONLY_LIMITS
        if getattr(running.limits, f) != getattr(new.limits, f)
    ]
    changed += [
        f"timeouts.{f}"
        for f in _RESTART_ONLY_TIMEOUTS
        if getattr(running.timeouts, f) != getattr(new.timeouts, f)
    ]
    return changed


def keep_restart_only(running: ProxyConfig, new: ProxyConfig) -> ProxyConfig:
    """`new` with every restart-only value as it runs."""
    kept = dataclasses.replace(new, **{f: getattr(running, f) for f in RESTART_ONLY})
    limits = dataclasses.replace(
        new.limits, **{f: getattr(running.limits, f) for f in _RESTART_ONLY_LIMITS}
    )
    timeouts = dataclasses.replace(
        new.timeouts, **{f: getattr(running.timeouts, f) for f in _RESTART_ONLY_TIMEOUTS}
    )
    return dataclasses.replace(kept, limits=limits, timeouts=timeouts)


def read(path: Path) -> tuple[ProxyConfig, PriceBook]:
    """Read and check the config file at `path` and its price book, as start-up does; raises
    `ReloadRefused` with the file, key and reason."""
    try:
        config = load_config(path)
        book = load_price_book(config.price_book_files)
        check_references(config, currencies=book.currencies, tools=book.tool_fees)
    except ConfigError as exc:
        raise ReloadRefused(str(exc)) from exc
    except PriceBookError as exc:
        raise ReloadRefused("; ".join(str(p) for p in exc.problems)) from exc
    return config, book


class Reloader:
    """Reloads of one app's configuration, one at a time, and their figures."""

    def __init__(
        self,
        config: ProxyConfig,
        book: PriceBook,
        apply: Apply,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = config.path
        self._config = config
        self._book = book
        self._apply = apply
        self._clock = clock
        self._lock = asyncio.Lock()
        self._successes = 0
        self._failures = 0
        self._loaded_at = clock()
        self._config_digest = _file_digest(config.path)
        self._running = fingerprint(config.path, config.price_book_files)
        """The files' fingerprint when what runs was read from them."""
        self._on_disk = self._running
        self._checked_at = time.monotonic()
        self._restart_pending = False
        self._attempted = self._running
        """The fingerprint of the files the last reload read (the watch retries only after
        they change again)."""

    @property
    def config(self) -> ProxyConfig:
        """The configuration running now (restart-only keys as at start)."""
        return self._config

    async def reload(self) -> bool:
        """Read, check and apply the files now; True if applied. Never raises for a bad file:
        the failure is logged and counted, and the proxy serves on as it was."""
        async with self._lock:
            on_disk = await asyncio.to_thread(
                fingerprint, self._path, self._config.price_book_files
            )
            self._attempted = on_disk
            self._on_disk, self._checked_at = on_disk, time.monotonic()
            try:
                config, book = await asyncio.to_thread(read, self._path)
                restart = restart_only_changes(self._config, config)
                config = keep_restart_only(self._config, config)
                self._apply(config, book)
            except ReloadRefused as exc:
                self._failures += 1
                log.error(
                    "reload refused, still serving the configuration loaded at %s: %s",
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._loaded_at)),
                    exc,
                )
                return False
            except Exception:  # a bug must not end the proxy: count it, serve on as it was
                self._failures += 1
                log.exception("reload failed inside the proxy; serving the last configuration")
                return False
            if restart:
                log.warning(
                    "reloaded %s, except %s: changing these needs a restart; they keep "
                    "their running values until then",
                    self._path,
                    ", ".join(restart),
                )
            self._restart_pending = bool(restart)
            self._config, self._book = config, book
            self._successes += 1
            self._loaded_at = self._clock()
            self._config_digest = _file_digest(self._path)
            # The files may have changed while they were read: what runs is what was read.
            self._running = fingerprint(self._path, config.price_book_files)
            self._on_disk, self._checked_at = self._running, time.monotonic()
            log.info(
                "reloaded %s: %d team(s), %d key(s), %d budget(s), price book %s",
                self._path,
                len(config.teams),
                len(config.keys),
                len(config.budgets),
                book.digest[:12],
            )
            return True

    def stale(self) -> bool:
        """Whether the files on disk are not what runs (checked at most every
        `STALE_CHECK_INTERVAL` seconds)."""
        now = time.monotonic()
        if now - self._checked_at >= STALE_CHECK_INTERVAL:
            self._on_disk = fingerprint(self._path, self._config.price_book_files)
            self._checked_at = now
        return self._restart_pending or self._on_disk != self._running

    async def watch(self, interval: float) -> None:
        """Reload whenever the files change (every `interval` seconds a fingerprint); a
        refused change is tried again only once the files change again."""
        while True:
            await asyncio.sleep(interval)
            try:
                on_disk = await asyncio.to_thread(
                    fingerprint, self._path, self._config.price_book_files
                )
            except Exception:  # never let the watch die: it is how ConfigMap updates arrive
                log.exception("cannot read the configuration files to watch them")
                continue
            if on_disk not in (self._running, self._attempted):
                log.info("%s or its price book changed on disk: reloading", self._path)
                await self.reload()

    def status(self) -> ReloadStatus:
        return ReloadStatus(
            successes=self._successes,
            failures=self._failures,
            loaded_at=self._loaded_at,
            config_digest=self._config_digest,
            book_digest=self._book.digest,
            stale=self.stale(),
        )
