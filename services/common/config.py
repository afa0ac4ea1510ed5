"""Typed configuration read once from environment variables.

Each service declares a frozen dataclass of settings and builds it with the
helpers here; every variable has a default that works on one machine. The
README's configuration table lists them all.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

N = TypeVar("N", int, float)


class ConfigError(ValueError):
    """An environment variable has a value that cannot be used."""


def env_str(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def _env_number(name: str, default: N, parse: Callable[[str], N], kind: str, minimum: N | None) -> N:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not {kind}") from exc
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value} is below the minimum {minimum}")
    return value


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    return _env_number(name, default, int, "an integer", minimum)


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    return _env_number(name, default, float, "a number", minimum)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")


def env_list(name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def ready_file() -> Path | None:
    """``CALLMESH_READY_FILE`` (unset): where a service writes its bound address once serving."""
    value = env_str("CALLMESH_READY_FILE", "")
    return Path(value) if value else None


def database_url() -> str:
    """``DATABASE_URL``: a ``postgresql://`` URL shared by the replicas of ingest and crm; empty: SQLite files."""
    url = env_str("DATABASE_URL", "")
    if url and not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"DATABASE_URL must be a postgresql:// URL, not {url.split(':', 1)[0]!r}")
    return url


RETENTION_SECONDS = 90 * 86400.0  # CALL_RETENTION_DAYS's default, 90 days


def call_retention() -> float:
    """``CALL_RETENTION_DAYS`` (default 90; 0 keeps them for good), in seconds: how long a finished call stays with
    us once the CRM has its record, in ingest's job store (a done call) and in crm's outbox (a delivered record)."""
    return env_float("CALL_RETENTION_DAYS", RETENTION_SECONDS / 86400, minimum=0.0) * 86400


def data_dir() -> Path:
    """``CALLMESH_DATA_DIR`` (default ``.data``): models, databases and recordings."""
    return Path(env_str("CALLMESH_DATA_DIR", ".data")).expanduser().resolve()


@dataclass(frozen=True)
class TlsSettings:
    """TLS between the services; the same variables serve both ends of every connection.

    ``GRPC_TLS_CERT``/``GRPC_TLS_KEY`` (PEM paths): this service's certificate, presented as a
    server and, for mutual TLS, as a client. ``GRPC_TLS_CA``: the CA that signed the peers'
    certificates. ``GRPC_TLS_CLIENT_AUTH=1``: servers require a client certificate signed by
    that CA (mutual TLS). ``GRPC_TLS_SERVER_NAME``: the name expected in servers' certificates
    when it differs from the host dialled. All unset: plaintext, for one machine.
    """

    cert: bytes | None
    key: bytes | None
    ca: bytes | None
    client_auth: bool
    server_name: str

    @property
    def enabled(self) -> bool:
        return self.cert is not None or self.ca is not None

    @classmethod
    def from_env(cls) -> "TlsSettings":
        def pem(name: str) -> bytes | None:
            path = env_str(name, "")
            if not path:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise ConfigError(f"{name}={path!r} cannot be read: {exc.strerror}") from exc

        cert, key, ca = pem("GRPC_TLS_CERT"), pem("GRPC_TLS_KEY"), pem("GRPC_TLS_CA")
        client_auth = env_bool("GRPC_TLS_CLIENT_AUTH", False)
        if (cert is None) != (key is None):
            raise ConfigError("GRPC_TLS_CERT and GRPC_TLS_KEY go together")
        if client_auth and (ca is None or cert is None):
            raise ConfigError("GRPC_TLS_CLIENT_AUTH=1 needs GRPC_TLS_CA, GRPC_TLS_CERT and GRPC_TLS_KEY")
        if cert is None and ca is not None and client_auth:
            raise ConfigError("mutual TLS needs this service's own certificate")
        return cls(cert, key, ca, client_auth, env_str("GRPC_TLS_SERVER_NAME", ""))


PLAINTEXT = TlsSettings(None, None, None, False, "")


@dataclass(frozen=True)
class GrpcServerSettings:
    """Where and how a gRPC service listens."""

    listen: str
    grace_seconds: float
    ready_file: Path | None
    tls: TlsSettings = PLAINTEXT
    metrics_listen: str = ""  # where /metrics is served; empty: not served

    @classmethod
    def from_env(cls, prefix: str, default_port: int, metrics_port: int) -> "GrpcServerSettings":
        """``{prefix}_LISTEN`` (127.0.0.1:default_port) and ``{prefix}_METRICS_LISTEN`` (127.0.0.1:metrics_port,
        ``off`` to disable)."""
        metrics_listen = env_str(f"{prefix}_METRICS_LISTEN", f"127.0.0.1:{metrics_port}")
        return cls(
            listen=env_str(f"{prefix}_LISTEN", f"127.0.0.1:{default_port}"),
            grace_seconds=env_float("SHUTDOWN_GRACE_SECONDS", 20.0, minimum=0.0),
            ready_file=ready_file(),
            tls=TlsSettings.from_env(),
            metrics_listen="" if metrics_listen == "off" else metrics_listen,
        )
