"""Live changes to a real ``serve`` process: SIGHUP (or the file watch) reloads the config file and
the price book; the process, its counters and its running calls carry on.

What README promises and these tests try to break: a new key works at once and a removed one is
refused at once, with the same process and a stream opened before the reload finishing
normally; a broken config is refused whole while the proxy serves on as it was, and says so in
its log and metrics; a price version added for a future instant applies from that instant; every
worker of ``--workers 2`` reloads; counters never reset.
"""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.auth import new_key
from tests.conftest import SHIPPED_BOOK
from tests.support.fake_deepseek import FakeDeepSeek, running_fake
from tests.support.fake_deepseek_shapes import Reply
from tests.support.proxy_harness import TEAM_KEYS
from tests.support.requests import BOUNDED_CHAT, BOUNDED_USAGE, auth
from tests.support.serve_process import (
    ServeProcess,
    eventually,
    ledger,
    serve_process,
    write_config,
)

pytestmark = pytest.mark.slow

GAMMA_KEY = new_key()
"""A key of a team that only the reloaded config has (made fresh: obviously not a real one)."""


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


async def scrape(serve: ServeProcess) -> str:
    async with httpx.AsyncClient(timeout=30) as http:
        return (await http.get(serve.url + "/metrics")).text


async def status(serve: ServeProcess, key: str, **extra: object) -> int:
    """One call on a new connection with `key`; its status."""
    async with httpx.AsyncClient(base_url=serve.url, timeout=30) as http:
        response = await http.post(
            "/chat/completions",
            json={**BOUNDED_CHAT, **extra},
            headers={"Authorization": f"Bearer {key}"},
        )
        return response.status_code


def rewrite(
    serve: ServeProcess,
    fake: FakeDeepSeek,
    keys: dict[str, list[str]],
    extra: str = "",
) -> None:
    """The serve process's config file, written again with other keys and top-level YAML."""
    write_config(serve.log.parent, fake.base_url, serve.port, extra=extra, keys=keys)


async def reloaded(serve: ServeProcess, count: int, what: str = "reloaded ") -> None:
    async def seen() -> bool:
        return serve.log.read_text().count(what) >= count

    await eventually(seen, f"{count} x {what!r} in the log", timeout=15)


async def test_a_new_key_works_at_once_and_a_running_stream_finishes(tmp_path: Path) -> None:
    async with running_fake() as fake:
        fake.enqueue(Reply(usage=BOUNDED_USAGE, content=["w"] * 40, chunk_interval=0.05))
        fake.enqueue(*[Reply(usage=BOUNDED_USAGE) for _ in range(5)])
        async with serve_process(tmp_path, fake.base_url) as serve:
            pid = serve.process.pid
            async with (
                httpx.AsyncClient(base_url=serve.url, headers=auth("alpha"), timeout=30) as http,
                http.stream(
                    "POST", "/chat/completions", json={**BOUNDED_CHAT, "stream": True}
                ) as stream,
            ):
                assert stream.status_code == 200
                assert await status(serve, GAMMA_KEY) == 401
                keys = {**{t: [k] for t, k in TEAM_KEYS.items()}, "gamma": [GAMMA_KEY]}
                rewrite(serve, fake, keys=keys)
                serve.process.send_signal(signal.SIGHUP)
                await reloaded(serve, 1)
                assert await status(serve, GAMMA_KEY) == 200
                body = b"".join([chunk async for chunk in stream.aiter_bytes()])
            assert body.endswith(b"data: [DONE]\n\n")
            assert body.count(b'"content":"w"') == 40
            assert serve.process.pid == pid and serve.process.returncode is None
            text = await scrape(serve)
            assert samples(text, "llm_config_reload_total") == {
                (("result", "failure"),): 0.0,
                (("result", "success"),): 1.0,
            }
            assert samples(text, "llm_config_stale") == {(): 0.0}
            # Counters never reset: both calls before and after the reload are counted.
            requests = samples(text, "llm_requests_total")
            assert sum(requests.values()) == 2
            serve.process.send_signal(signal.SIGTERM)
            assert await serve.process.wait() == 0
    rows = ledger(serve.ledger, "SELECT team, stream, outcome FROM usage ORDER BY started_at")
    assert rows == [("alpha", 1, "complete"), ("gamma", 0, "complete")]


async def test_a_broken_config_is_refused_whole_and_the_proxy_serves_on(tmp_path: Path) -> None:
    async with running_fake() as fake:
        fake.enqueue(*[Reply(usage=BOUNDED_USAGE) for _ in range(5)])
        async with serve_process(tmp_path, fake.base_url) as serve:
            keys = {**{t: [k] for t, k in TEAM_KEYS.items()}, "gamma": [GAMMA_KEY]}
            # A budget in a currency the book has no prices in: the whole file is refused,
            # the new key included.
            budget = "budgets:\n  gamma:\n    - {period: day, amount: 1, currency: EUR}\n"
            rewrite(serve, fake, keys=keys, extra=budget)
            serve.process.send_signal(signal.SIGHUP)
            await reloaded(serve, 1, "reload refused")
            log = serve.log.read_text()
            assert "budgets.gamma[0].currency: 'EUR' is not a currency of the price book" in log
            assert await status(serve, GAMMA_KEY) == 401
            assert await status(serve, TEAM_KEYS["alpha"]) == 200
            text = await scrape(serve)
            assert samples(text, "llm_config_reload_total") == {
                (("result", "failure"),): 1.0,
                (("result", "success"),): 0.0,
            }
            assert samples(text, "llm_config_stale") == {(): 1.0}
            # Fixed on disk and reloaded: applied, and no longer stale.
            rewrite(serve, fake, keys=keys)
            serve.process.send_signal(signal.SIGHUP)
            await reloaded(serve, 1)
            assert await status(serve, GAMMA_KEY) == 200
            assert samples(await scrape(serve), "llm_config_stale") == {(): 0.0}


async def test_a_removed_key_is_refused_at_once(tmp_path: Path) -> None:
    async with running_fake() as fake:
        fake.enqueue(*[Reply(usage=BOUNDED_USAGE) for _ in range(5)])
        async with serve_process(tmp_path, fake.base_url) as serve:
            assert await status(serve, TEAM_KEYS["beta"]) == 200
            rotated = new_key()  # beta's new key: both valid until the old one's line goes
            rewrite(
                serve,
                fake,
                keys={"alpha": [TEAM_KEYS["alpha"]], "beta": [TEAM_KEYS["beta"], rotated]},
            )
            serve.process.send_signal(signal.SIGHUP)
            await reloaded(serve, 1)
            assert await status(serve, rotated) == 200
            assert await status(serve, TEAM_KEYS["beta"]) == 200
            rewrite(serve, fake, keys={"alpha": [TEAM_KEYS["alpha"]], "beta": [rotated]})
            serve.process.send_signal(signal.SIGHUP)
            await reloaded(serve, 2)
            assert await status(serve, TEAM_KEYS["beta"]) == 401
            assert await status(serve, rotated) == 200


def book_with(folder: Path, versions: str) -> Path:
    """The shipped price book with `versions` added to deepseek-flash's list."""
    text = SHIPPED_BOOK.read_text(encoding="utf-8")
    anchor = "  deepseek-flash:\n"
    assert text.count(anchor) == 1
    path = folder / "book.yaml"
    path.write_text(text.replace(anchor, anchor + versions), encoding="utf-8")
    return path


def flat(at: datetime, label: str, cny: str) -> str:
    return (
        f"    - from: {at.strftime('%Y-%m-%dT%H:%M:%SZ')}\n"
        f"      label: {label}\n"
        f"      rates: {{CNY: {cny}, USD: 0.01 / 0.1 / 0.2}}\n"
        "      source: https://example.com/test-price-change\n"
        "      confidence: unverified\n"
    )


async def test_a_price_version_added_for_the_future_applies_from_its_instant(
    tmp_path: Path,
) -> None:
    """The running book prices deepseek-flash at a flat rate since yesterday; a reload adds a
    version that doubles it from a few seconds ahead: calls before that instant are priced at
    the old rate, calls after it at the new one, without a restart; each row names its book."""
    now = datetime.now(UTC).replace(microsecond=0)
    old = flat(now - timedelta(days=1), "test flat rate", "0.1 / 1 / 2")
    book = book_with(tmp_path, old)
    async with running_fake() as fake:
        fake.enqueue(*[Reply(usage=BOUNDED_USAGE) for _ in range(5)])
        async with serve_process(tmp_path, fake.base_url, book=book) as serve:
            assert await status(serve, TEAM_KEYS["alpha"]) == 200
            change = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=4)
            new = flat(change, "test rate doubled", "0.2 / 2 / 4")
            staging = tmp_path / "book.yaml.new"
            staging.write_text(
                SHIPPED_BOOK.read_text(encoding="utf-8").replace(
                    "  deepseek-flash:\n", "  deepseek-flash:\n" + old + new
                ),
                encoding="utf-8",
            )
            staging.replace(book)
            serve.process.send_signal(signal.SIGHUP)
            await reloaded(serve, 1)
            assert await status(serve, TEAM_KEYS["alpha"]) == 200  # before the change

            async def past_the_change() -> bool:
                return datetime.now(UTC) > change + timedelta(milliseconds=200)

            await eventually(past_the_change, "the new version's instant", timeout=10)
            assert await status(serve, TEAM_KEYS["alpha"]) == 200
            serve.process.send_signal(signal.SIGTERM)
            assert await serve.process.wait() == 0
    rows = ledger(
        serve.ledger,
        "SELECT u.price_book, c.amount FROM usage u JOIN usage_cost c USING (request_id) "
        "WHERE c.currency = 'CNY' ORDER BY u.started_at",
    )
    # 100 cache-miss tokens and 20 output tokens: at 1 and 2 CNY per million, then 2 and 4.
    assert [Decimal(str(amount)) for _, amount in rows] == [
        Decimal("0.00014"),
        Decimal("0.00014"),
        Decimal("0.00028"),
    ]
    books = [digest for digest, _ in rows]
    assert books[0] != books[1] == books[2]  # the reloaded book priced the last two


async def test_every_worker_reloads(tmp_path: Path) -> None:
    async with running_fake() as fake:
        fake.enqueue(*[Reply(usage=BOUNDED_USAGE) for _ in range(40)])
        async with serve_process(tmp_path, fake.base_url, workers=2) as serve:
            keys = {**{t: [k] for t, k in TEAM_KEYS.items()}, "gamma": [GAMMA_KEY]}
            rewrite(serve, fake, keys=keys)
            serve.process.send_signal(signal.SIGHUP)
            await reloaded(serve, 2)  # one line per worker
            # New connections land on either worker (the kernel spreads them).
            statuses = await asyncio.gather(*(status(serve, GAMMA_KEY) for _ in range(20)))
            assert statuses == [200] * 20
            serve.process.send_signal(signal.SIGTERM)
            assert await serve.process.wait() == 0


async def test_the_file_watch_reloads_without_a_signal(tmp_path: Path) -> None:
    """``reload: {watch: S}``, as a ConfigMap update arrives in Kubernetes: the change is
    applied within the interval, without SIGHUP."""
    async with running_fake() as fake:
        fake.enqueue(*[Reply(usage=BOUNDED_USAGE) for _ in range(5)])
        watch = "reload: {watch: 0.2}\n"
        async with serve_process(tmp_path, fake.base_url, extra_config=watch) as serve:
            keys = {**{t: [k] for t, k in TEAM_KEYS.items()}, "gamma": [GAMMA_KEY]}
            rewrite(serve, fake, keys=keys, extra=watch)
            await reloaded(serve, 1)
            assert await status(serve, GAMMA_KEY) == 200
            assert "SIGHUP" not in serve.log.read_text()


async def test_a_key_that_needs_a_restart_keeps_its_running_value(tmp_path: Path) -> None:
    """A reload that also moves the listening port applies the rest, keeps serving where it
    listens, names the key in a warning, and shows the files as stale until a restart."""
    async with running_fake() as fake:
        fake.enqueue(*[Reply(usage=BOUNDED_USAGE) for _ in range(5)])
        async with serve_process(tmp_path, fake.base_url) as serve:
            keys = {**{t: [k] for t, k in TEAM_KEYS.items()}, "gamma": [GAMMA_KEY]}
            write_config(tmp_path, fake.base_url, serve.port + 1, keys=keys)
            serve.process.send_signal(signal.SIGHUP)
            await reloaded(serve, 1)
            assert "except listen.port: changing these needs a restart" in serve.log.read_text()
            assert await status(serve, GAMMA_KEY) == 200  # served where it listened
            assert samples(await scrape(serve), "llm_config_stale") == {(): 1.0}


async def test_a_changed_budget_applies_to_the_next_call(tmp_path: Path) -> None:
    """A hard budget with room lowered by a reload below what was spent: the next call of the
    team is refused (402); raised again, it is admitted; the spend is never forgotten."""
    keys = {t: [k] for t, k in TEAM_KEYS.items()}

    def budget(amount: str) -> str:
        line = f"{{period: month, amount: '{amount}', currency: CNY, hard: true}}"
        return f"budgets:\n  alpha:\n    - {line}\n"

    async with running_fake() as fake:
        fake.enqueue(*[Reply(usage=BOUNDED_USAGE) for _ in range(5)])
        async with serve_process(tmp_path, fake.base_url, extra_config=budget("100")) as serve:
            assert await status(serve, TEAM_KEYS["alpha"]) == 200
            rewrite(serve, fake, keys=keys, extra=budget("0.001"))
            serve.process.send_signal(signal.SIGHUP)
            await reloaded(serve, 1)
            assert await status(serve, TEAM_KEYS["alpha"]) == 402
            assert await status(serve, TEAM_KEYS["beta"]) == 200  # no budget: untouched
            rewrite(serve, fake, keys=keys, extra=budget("100"))
            serve.process.send_signal(signal.SIGHUP)
            await reloaded(serve, 2)
            assert await status(serve, TEAM_KEYS["alpha"]) == 200
