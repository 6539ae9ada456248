"""The proxy's configuration file, read once at start-up into frozen dataclasses.

Every defect fails start-up with the file, the key and the reason (`ConfigError`). Relative paths
in the file are relative to the file's own folder, so the proxy behaves the same whatever the
working directory. Secrets never sit in the file: it names the environment variable that holds
the DeepSeek key, and client keys appear only as SHA-256 hashes. Only the entry point reads the
environment (`proxy.serve`).
"""

from proxy.config.loader import check_references, load_config
from proxy.config.model import (
    DEFAULT_BALANCE_INTERVAL,
    DEFAULT_CONFIG,
    DEFAULT_FLUSH_INTERVAL,
    DEFAULT_LEASE,
    DEFAULT_LEDGER,
    DEFAULT_MAX_QUEUED_RECORDS,
    DEFAULT_POLICY,
    DEFAULT_SHUTDOWN_TIMEOUT,
    Budget,
    ConfigError,
    Limits,
    OverBudget,
    PriceAt,
    ProxyConfig,
    TeamPolicy,
    Timeouts,
)

__all__ = [
    "DEFAULT_BALANCE_INTERVAL",
    "DEFAULT_CONFIG",
    "DEFAULT_FLUSH_INTERVAL",
    "DEFAULT_LEASE",
    "DEFAULT_LEDGER",
    "DEFAULT_MAX_QUEUED_RECORDS",
    "DEFAULT_POLICY",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "Budget",
    "ConfigError",
    "Limits",
    "OverBudget",
    "PriceAt",
    "ProxyConfig",
    "TeamPolicy",
    "Timeouts",
    "check_references",
    "load_config",
]
