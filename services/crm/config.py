"""Settings of the crm service, from the environment."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from services.common.config import (
    RETENTION_SECONDS, ConfigError, GrpcServerSettings, call_retention, data_dir, database_url, env_bool, env_float,
    env_int, env_list, env_str,
)
from services.common.https import outbound_tls_ca
from services.common.webhooks import Webhook, webhook_secret


@dataclass(frozen=True)
class CrmSettings:
    server: GrpcServerSettings
    crm_url: str  # where records are POSTed as JSON; empty keeps them queued
    crm_token: str = field(repr=False)  # sent as a bearer token when set
    database: Path  # the SQLite outbox, when database_url is empty
    database_url: str  # PostgreSQL shared by all CRM replicas; empty: SQLite
    timeout_seconds: float
    backoff_initial: float
    backoff_max: float
    batch: int  # records claimed per round; posted one after another, oldest first
    lease_seconds: float  # how long a claimed record is held before another replica may take it
    redact_pii: bool = True  # mask personal data in the record before it is stored and sent
    delivered_retention: float = RETENTION_SECONDS  # a delivered record stays in the outbox this long; 0: for good
    tls_ca: str = ""  # a PEM CA bundle trusted besides the system's for an https CRM_URL (OUTBOUND_TLS_CA)
    crm_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # sent with every POST (CRM_HEADERS)
    signing_secret: str = field(default="", repr=False)  # whsec_…: every POST signed (Standard Webhooks)

    @functools.cached_property
    def signer(self) -> Webhook | None:
        """CRM_SIGNING_SECRET, parsed once: what signs each POST (None: unsigned); a :class:`ConfigError` when it
        is not ``whsec_<base64>``."""
        return webhook_secret("CRM_SIGNING_SECRET", self.signing_secret) if self.signing_secret else None

    @classmethod
    def from_env(cls) -> "CrmSettings":
        settings = cls(
            server=GrpcServerSettings.from_env("CRM_SYNC", 50053, 9103),
            crm_url=env_str("CRM_URL", ""),
            crm_token=env_str("CRM_TOKEN", ""),
            database=outbox_path(),
            database_url=database_url(),
            timeout_seconds=env_float("CRM_TIMEOUT_SECONDS", 15.0, minimum=0.1),
            backoff_initial=env_float("CRM_BACKOFF_INITIAL_SECONDS", 1.0, minimum=0.01),
            backoff_max=env_float("CRM_BACKOFF_MAX_SECONDS", 60.0, minimum=0.01),
            batch=env_int("CRM_DELIVERY_BATCH", 16, minimum=1),
            lease_seconds=env_float("CRM_LEASE_SECONDS", 60.0, minimum=1.0),
            redact_pii=env_bool("PII_REDACTION", True),
            delivered_retention=call_retention(),
            tls_ca=outbound_tls_ca(),
            crm_headers=crm_headers(),
            signing_secret=env_str("CRM_SIGNING_SECRET", ""),
        )
        settings.signer  # a secret that is not whsec_<base64> is refused at start, not at each POST
        if settings.crm_token and any(name.lower() == "authorization" for name, _ in settings.crm_headers):
            raise ConfigError("CRM_TOKEN and an Authorization header in CRM_HEADERS are both set: keep one")
        if settings.lease_seconds <= settings.timeout_seconds:
            raise ConfigError(f"CRM_LEASE_SECONDS ({settings.lease_seconds:g}) must be longer than "
                              f"CRM_TIMEOUT_SECONDS ({settings.timeout_seconds:g}): a lease covers one POST")
        return settings


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a token (RFC 9110)
# Set by the delivery itself: the record's JSON, its key for the CRM's deduplication, its signature
# (CRM_SIGNING_SECRET), and the connection's own.
_OURS = {"content-type", "content-length", "idempotency-key", "host", "transfer-encoding", "connection",
         "webhook-id", "webhook-timestamp", "webhook-signature"}


def crm_headers() -> tuple[tuple[str, str], ...]:
    """``CRM_HEADERS``: ``Name=value`` pairs, comma-separated, sent with every POST to the CRM (an API key header,
    a tenant, ``Authorization=Basic …`` for a CRM that does not take a bearer token); or, for a value that holds a
    comma, a JSON object of names to values."""
    raw = env_str("CRM_HEADERS", "").strip()
    if raw.startswith("{"):
        try:
            given = json.loads(raw)
        except ValueError as exc:
            raise ConfigError(f"CRM_HEADERS: not a JSON object of header names to values: {exc}") from None
        if not isinstance(given, dict) or not all(isinstance(v, str) for v in given.values()):
            raise ConfigError("CRM_HEADERS: not a JSON object of header names to values (strings)")
        pairs = [(name.strip(), "=", value.strip()) for name, value in given.items()]
    else:
        pairs = [tuple(part.strip() for part in item.partition("=")) for item in env_list("CRM_HEADERS")]
    headers = []
    for name, equals, value in pairs:
        if not equals or not _HEADER_NAME.fullmatch(name):
            raise ConfigError(f"CRM_HEADERS: {name!r} is not Name=value with a header name "
                              "(letters, digits and -)")
        if name.lower() in _OURS:
            raise ConfigError(f"CRM_HEADERS: {name} is set by the delivery itself")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ConfigError(f"CRM_HEADERS: the value of {name} has a control character")
        headers.append((name, value))
    return tuple(headers)


def outbox_path() -> Path:
    """``CRM_DATABASE``: the SQLite outbox, when ``DATABASE_URL`` is unset."""
    return Path(env_str("CRM_DATABASE", str(data_dir() / "crm-outbox.db")))
