"""The https that ingest (recordings) and crm (``CRM_URL``) speak out: whose certificates they trust.

On premises, recorders and CRMs often serve certificates of the company's own CA. ``OUTBOUND_TLS_CA`` names a PEM
bundle trusted besides the system's CAs; a certificate still not trusted is said so, with that setting named.
"""

from __future__ import annotations

import ipaddress
import ssl

import aiohttp

from services.common.config import ConfigError, env_str


def outbound_tls_ca() -> str:
    """``OUTBOUND_TLS_CA``: a PEM CA bundle trusted besides the system's (empty: the system's alone)."""
    return env_str("OUTBOUND_TLS_CA", "")


def https_context(ca_file: str = "") -> ssl.SSLContext:
    """Certificate and host-name checks against the system's CAs and those of ``ca_file``."""
    context = ssl.create_default_context()
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"OUTBOUND_TLS_CA={ca_file}: not a readable PEM CA bundle ({exc})") from exc
    return context


def untrusted_certificate(exc: BaseException, who: str) -> str | None:
    """What to say when ``exc`` is a certificate that failed the checks (None for any other error)."""
    if not isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return None
    return (f"{who}'s TLS certificate is not trusted ({exc.certificate_error}); if your own CA issued it, set "
            "OUTBOUND_TLS_CA to that CA's PEM bundle")


def is_this_machine(host: str) -> bool:
    """Whether ``host`` (a URL's host name, lower case) is this machine: what goes there crosses no network."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
