"""Typed configuration read once from environment variables.

Each service declares a frozen dataclass of settings and builds it with the
helpers here; every variable has a default that works on one machine. The
README's configuration table lists them all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """An environment variable has a value that cannot be used."""


def env_str(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not an integer") from exc
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value} is below the minimum {minimum}")
    return value


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not a number") from exc
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value} is below the minimum {minimum}")
    return value


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


def data_dir() -> Path:
    """``CALLMESH_DATA_DIR`` (default ``.data``): models, databases and recordings."""
    return Path(env_str("CALLMESH_DATA_DIR", ".data")).expanduser().resolve()


@dataclass(frozen=True)
class GrpcServerSettings:
    """Where and how a gRPC service listens."""

    listen: str
    grace_seconds: float
    ready_file: Path | None

    @classmethod
    def from_env(cls, prefix: str, default_port: int) -> "GrpcServerSettings":
        return cls(
            listen=env_str(f"{prefix}_LISTEN", f"127.0.0.1:{default_port}"),
            grace_seconds=env_float("SHUTDOWN_GRACE_SECONDS", 20.0, minimum=0.0),
            ready_file=ready_file(),
        )
