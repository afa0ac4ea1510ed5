"""Which recording URLs we fetch, checked the OWASP SSRF way.

At the webhook (no network): scheme, credentials, host against the allow-list,
and literal IP addresses in any spelling (dotted, decimal, octal, hex, IPv6,
IPv4-mapped). At download time: every address the name resolves to, and each
redirect hop again.

``file:`` URLs name recordings on a share mounted on ingest's machine; they are
taken only under the directories of RECORDING_FILE_ROOTS (none by default), as
written at the webhook, and with every link resolved at download time.
"""

from __future__ import annotations

import ipaddress
import posixpath
import socket
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class UrlRejected(ValueError):
    """The URL may not be fetched; the message says why."""


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address a host string spells, in any of the forms resolvers accept, or None for a name."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:  # inet_aton accepts 2130706433, 0x7f.1, 0177.0.0.1 ... as getaddrinfo does
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def is_public(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or address.sixtofour
        if mapped is not None:
            return is_public(mapped)
        if address.teredo is not None:
            return False
    return address.is_global and not (address.is_multicast or address.is_reserved or address.is_loopback
                                      or address.is_link_local or address.is_private or address.is_unspecified)


def under(path: str, roots: tuple[str, ...]) -> bool:
    """Whether the absolute, normalised ``path`` is one of ``roots`` or below one."""
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


@dataclass(frozen=True)
class UrlPolicy:
    allowed_hosts: tuple[str, ...]
    allowed_networks: tuple[IPNetwork, ...]
    file_roots: tuple[str, ...] = ()  # absolute, normalised directories whose files file: URLs may name

    def file_path(self, url: str) -> str:
        """The file a ``file:`` URL names, absolute and normalised, if it lies under RECORDING_FILE_ROOTS."""
        parts = urlsplit(url)
        if not self.file_roots:
            raise UrlRejected("recording_url must be http or https, not 'file' (file: URLs are taken only under "
                              "RECORDING_FILE_ROOTS, which is not set)")
        if parts.netloc not in ("", "localhost"):
            raise UrlRejected(f"a file: URL names a file on this machine, not on {parts.netloc!r}")
        path = unquote(parts.path)
        if not path.startswith("/") or "\x00" in path:
            raise UrlRejected("a file: URL needs an absolute path")
        normal = posixpath.normpath(path)
        if normal.startswith("//"):  # POSIX keeps a leading double slash
            normal = "/" + normal.lstrip("/")
        if not under(normal, self.file_roots):
            raise UrlRejected(f"{normal} is not under RECORDING_FILE_ROOTS")
        return normal

    def check_address(self, address: IPAddress, host: str) -> None:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in net for net in self.allowed_networks):
            return
        if not is_public(address):
            raise UrlRejected(f"{host} is {address}, a private, loopback, link-local or reserved address "
                              "that is not in RECORDING_ALLOWED_NETWORKS")

    def check_url(self, url: str) -> tuple[str, str, int]:
        """Check what can be checked without the network; return (scheme, host, port)."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise UrlRejected(f"recording_url is not a valid URL: {exc}") from exc
        scheme = parts.scheme.lower()
        if scheme == "file":
            self.file_path(url)
            return scheme, "", 0
        if scheme not in ("http", "https"):
            raise UrlRejected(f"recording_url must be http or https, not {scheme or 'empty'!r}")
        if parts.username is not None or parts.password is not None:
            raise UrlRejected("recording_url must not carry credentials")
        host = (parts.hostname or "").lower().rstrip(".")
        if not host:
            raise UrlRejected("recording_url has no host")
        if self.allowed_hosts and host not in self.allowed_hosts:
            raise UrlRejected(f"host {host!r} is not in RECORDING_ALLOWED_HOSTS")
        literal = parse_ip_literal(host)
        if literal is not None:
            self.check_address(literal, host)
        return scheme, host, port or (443 if scheme == "https" else 80)
