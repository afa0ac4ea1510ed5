"""Settings of the ingest service, from the environment."""

from __future__ import annotations

import ipaddress
import posixpath
import socket
from dataclasses import dataclass, field
from pathlib import Path

from services.common.config import (
    PLAINTEXT, RETENTION_SECONDS, ConfigError, TlsSettings, call_retention, data_dir, database_url, env_bool,
    env_float, env_int, env_list, env_str, ready_file,
)
from services.common.https import outbound_tls_ca


def _networks(name: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    nets = []
    for item in env_list(name):
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError as exc:
            raise ConfigError(f"{name}: {item!r} is not a network in CIDR notation") from exc
    return tuple(nets)


def _file_roots() -> tuple[str, ...]:
    roots = []
    for item in env_list("RECORDING_FILE_ROOTS"):
        if not item.startswith("/"):
            raise ConfigError(f"RECORDING_FILE_ROOTS: {item!r} is not an absolute directory")
        roots.append(posixpath.normpath(item))
    return tuple(roots)


def _choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = env_str(name, default).strip().lower()
    if value not in allowed:
        raise ConfigError(f"{name}={value!r}: use one of {', '.join(allowed)}")
    return value


@dataclass(frozen=True)
class DownloadSettings:
    allowed_hosts: tuple[str, ...]  # empty: any host name (addresses are still checked)
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    max_bytes: int
    connect_timeout: float
    read_timeout: float
    total_timeout: float
    max_redirects: int
    directory: Path
    failed_retention: float = 7 * 24 * 3600.0  # seconds a failed call keeps its recording for a retry; 0: until retried
    min_free_bytes: int = 0  # bytes a download leaves free on the recordings' disk (it waits for room otherwise)
    max_dir_bytes: int = 0  # bytes all recordings in the directory may take together; 0: no cap
    not_ready_seconds: float = 0.0  # a recording answered 404 (or 403) is waited for this long after the webhook
    authorization: str = field(default="", repr=False)  # the Authorization header for authorization_hosts' recordings
    authorization_hosts: tuple[str, ...] = ()  # the host names (lower case) that get it
    tls_ca: str = ""  # a PEM CA bundle trusted besides the system's for https recordings (OUTBOUND_TLS_CA)
    file_roots: tuple[str, ...] = ()  # directories (absolute, normalised) whose files file: URLs may name
    file_settle_seconds: float = 2.0  # a file on the share is copied once it has not changed for this long

    def authorization_for(self, host: str) -> str:
        """The Authorization header a download from ``host`` carries (empty: none)."""
        return self.authorization if host.lower() in self.authorization_hosts else ""

    @classmethod
    def from_env(cls, root: Path) -> "DownloadSettings":
        authorization = env_str("RECORDING_AUTHORIZATION", "")
        authorization_hosts = tuple(h.lower() for h in env_list("RECORDING_AUTHORIZATION_HOSTS"))
        if authorization and not authorization_hosts:
            raise ConfigError("RECORDING_AUTHORIZATION is set without RECORDING_AUTHORIZATION_HOSTS: name the "
                              "recorder's host(s), or the credential would go to whatever host a webhook names")
        if authorization_hosts and not authorization:
            raise ConfigError("RECORDING_AUTHORIZATION_HOSTS is set without RECORDING_AUTHORIZATION")
        return cls(
            allowed_hosts=tuple(h.lower() for h in env_list("RECORDING_ALLOWED_HOSTS")),
            allowed_networks=_networks("RECORDING_ALLOWED_NETWORKS"),
            max_bytes=env_int("RECORDING_MAX_BYTES", 2 * 1024**3, minimum=1),
            connect_timeout=env_float("RECORDING_CONNECT_TIMEOUT_SECONDS", 10.0, minimum=0.1),
            read_timeout=env_float("RECORDING_READ_TIMEOUT_SECONDS", 30.0, minimum=0.1),
            total_timeout=env_float("RECORDING_TOTAL_TIMEOUT_SECONDS", 1800.0, minimum=1.0),
            max_redirects=env_int("RECORDING_MAX_REDIRECTS", 3, minimum=0),
            directory=Path(env_str("RECORDING_DIR", str(root / "recordings"))),
            failed_retention=env_float("RECORDING_FAILED_RETENTION_HOURS", 168.0, minimum=0.0) * 3600,
            min_free_bytes=env_int("RECORDING_MIN_FREE_BYTES", 1024**3, minimum=0),
            max_dir_bytes=env_int("RECORDING_DIR_MAX_BYTES", 0, minimum=0),
            not_ready_seconds=env_float("RECORDING_NOT_READY_SECONDS", 0.0, minimum=0.0),
            authorization=authorization,
            authorization_hosts=authorization_hosts,
            tls_ca=outbound_tls_ca(),
            file_roots=_file_roots(),
            file_settle_seconds=env_float("RECORDING_FILE_SETTLE_SECONDS", 2.0, minimum=0.0),
        )


@dataclass(frozen=True)
class PipelineSettings:
    transcribe_addr: str
    analyze_addr: str
    crm_addr: str
    worker_id: str
    concurrency: int
    max_attempts: int
    backoff_initial: float
    backoff_max: float
    transcribe_timeout: float
    analyze_timeout: float
    rpc_timeout: float
    delivery_poll_seconds: float
    chunk_bytes: int
    lease_seconds: float  # a job is held this long without a heartbeat before another worker may take it
    translation_source: str = "llm"  # "llm": the analysis model translates; "whisper": the speech model does
    tls: TlsSettings = PLAINTEXT
    done_retention: float = RETENTION_SECONDS  # a done call stays in the job store this long; 0: for good
    redact_pii: bool = True  # mask personal data in the transcript before it is stored (and so before the LLM)

    @classmethod
    def from_env(cls) -> "PipelineSettings":
        return cls(
            transcribe_addr=env_str("TRANSCRIBE_ADDR", "127.0.0.1:50051"),
            analyze_addr=env_str("ANALYZE_ADDR", "127.0.0.1:50052"),
            crm_addr=env_str("CRM_SYNC_ADDR", "127.0.0.1:50053"),
            worker_id=env_str("INGEST_WORKER_ID", socket.gethostname()),
            concurrency=env_int("PIPELINE_CONCURRENCY", 4, minimum=1),
            max_attempts=env_int("PIPELINE_MAX_ATTEMPTS", 6, minimum=1),
            backoff_initial=env_float("PIPELINE_BACKOFF_INITIAL_SECONDS", 2.0, minimum=0.01),
            backoff_max=env_float("PIPELINE_BACKOFF_MAX_SECONDS", 120.0, minimum=0.01),
            transcribe_timeout=env_float("TRANSCRIBE_TIMEOUT_SECONDS", 3600.0, minimum=1.0),
            analyze_timeout=env_float("ANALYZE_TIMEOUT_SECONDS", 900.0, minimum=1.0),
            rpc_timeout=env_float("RPC_TIMEOUT_SECONDS", 15.0, minimum=0.1),
            delivery_poll_seconds=env_float("DELIVERY_POLL_SECONDS", 2.0, minimum=0.05),
            chunk_bytes=env_int("TRANSCRIBE_CHUNK_BYTES", 256 * 1024, minimum=1024),
            lease_seconds=env_float("PIPELINE_LEASE_SECONDS", 120.0, minimum=1.0),
            translation_source=_choice("TRANSLATION_SOURCE", "llm", ("llm", "whisper")),
            tls=TlsSettings.from_env(),
            done_retention=call_retention(),
            redact_pii=env_bool("PII_REDACTION", True),
        )


@dataclass(frozen=True)
class IngestSettings:
    host: str
    port: int
    database: Path  # the SQLite job store, when database_url is empty
    database_url: str  # PostgreSQL shared by all ingest replicas; empty: SQLite
    public_url: str  # base of the status URLs we hand out; empty: from the request
    download: DownloadSettings
    pipeline: PipelineSettings
    grace_seconds: float
    ready_file: Path | None
    read_timeout: float = 30.0  # seconds a client has to send a request; an idle connection is closed after it
    metrics_listen: str = ""  # where /metrics is served apart from the API; empty: on the API's port

    @classmethod
    def from_env(cls) -> "IngestSettings":
        root = data_dir()
        return cls(
            host=env_str("INGEST_HOST", "127.0.0.1"),
            port=env_int("INGEST_PORT", 8080, minimum=0),
            database=job_store_path(),
            database_url=database_url(),
            public_url=env_str("INGEST_PUBLIC_URL", "").rstrip("/"),
            download=DownloadSettings.from_env(root),
            pipeline=PipelineSettings.from_env(),
            grace_seconds=env_float("SHUTDOWN_GRACE_SECONDS", 20.0, minimum=0.0),
            ready_file=ready_file(),
            read_timeout=env_float("INGEST_READ_TIMEOUT_SECONDS", 30.0, minimum=0.1),
            metrics_listen=env_str("INGEST_METRICS_LISTEN", ""),
        )


def job_store_path() -> Path:
    """``INGEST_DATABASE``: the SQLite job store, when ``DATABASE_URL`` is unset."""
    return Path(env_str("INGEST_DATABASE", str(data_dir() / "ingest.db")))
