"""The PostgreSQL the ledger's tests run against is a real server with exact numerics, and it
leaves nothing behind (tests/support/postgres.py)."""

from __future__ import annotations

import pytest

from tests.support.postgres import Postgres, require_postgres, running_postgres


def test_the_server_keeps_money_exact(postgres: Postgres) -> None:
    postgres.psql("CREATE TABLE IF NOT EXISTS money_check (amount numeric NOT NULL)")
    postgres.psql("INSERT INTO money_check VALUES (0.1), (0.2), (0.00000001)")
    assert postgres.psql("SELECT sum(amount) FROM money_check") == "0.30000001"


def test_the_server_and_its_folder_go_when_the_context_ends() -> None:
    """Nothing outlives a test run: no process on the port, no folder."""
    require_postgres()
    with running_postgres() as server:
        assert server.psql("SELECT 1") == "1"
        data = server.data
    assert not data.exists()
    with pytest.raises(RuntimeError):
        server.psql("SELECT 1")
