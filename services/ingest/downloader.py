"""Download a recording to disk safely: vetted addresses, checked redirects, limits, audio sniffing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import stat
import time
import uuid
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from opentelemetry import trace

from services.common.https import https_context, is_this_machine, untrusted_certificate
from services.common.limits import NO_ROOM_ERRNOS
from services.common.telemetry import client_trace_config, shown_url, tracer
from services.ingest.config import DownloadSettings
from services.ingest.urlpolicy import UrlPolicy, UrlRejected, parse_ip_literal, under

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

_REDIRECTS = {301, 302, 303, 307, 308}
_PERMANENT_HTTP = {400, 401, 403, 404, 405, 410, 451}
# What recording stores answer for a signed link past its expiry (S3 and Azure 403, Google Cloud Storage 400).
_EXPIRED_LINK_HTTP = {400, 401, 403, 410}
_EXPIRED_LINK_HINT = " (a signed link that has expired is answered so: send the webhook again with a new link)"
_NOT_THERE_HTTP = {403, 404}  # what a recording store answers for a recording not uploaded yet (S3: 403 without ListBucket)
_CHUNK_BYTES = 256 * 1024
RECORDING_SUFFIX = ".audio"  # a complete recording, under a name made here
PARTIAL_SUFFIX = ".partial"  # a recording still being written
_MIN_SETTLE_AFTER_CHANGE = 0.25  # seconds a file that changed while it was copied is left before the next copy
# Files on the share dated ahead of this machine's clock, as last seen (version, monotonic time): at most this many.
_AHEAD_KEPT = 4096
ROOM_CHECK_BYTES = 4 * 1024 * 1024  # the free space is looked at again after each this many bytes written


class DownloadError(Exception):
    """The recording could not be fetched. ``permanent`` says whether trying again can help; ``waiting``, that
    the call should wait for it without using up its attempts (the recordings disk has no room)."""

    def __init__(self, message: str, *, permanent: bool, waiting: bool = False, not_there: bool = False,
                 still_written_for: float | None = None, seen_changing: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.waiting = waiting
        # The recording is not where the link points (404, S3's 403 for a missing object, no such file): it may
        # not be uploaded yet (RECORDING_NOT_READY_SECONDS).
        self.not_there = not_there
        # The file on the share is still being written: look again after this many seconds (it is copied once it
        # has not changed for RECORDING_FILE_SETTLE_SECONDS), without holding a download slot meanwhile.
        self.still_written_for = still_written_for
        # With ``still_written_for``: whether the file was seen to change (False: it may have; only a later look
        # can tell, as for a file dated ahead of this machine's clock).
        self.seen_changing = seen_changing


def _size(n: int) -> str:
    """A size for a person: 1.1 GB, 67 MB, 50 KB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}" if unit == "GB" else f"{n / scale:,.0f} {unit}"
    return f"{n} bytes"


@dataclass(frozen=True)
class Downloaded:
    path: Path
    size: int
    content_type: str


def looks_like_audio(head: bytes) -> bool:
    """Recognise the containers FFmpeg reads for recordings from their first bytes."""
    if len(head) < 4:
        return False
    if head[:4] == b"RIFF" and head[8:12] in (b"WAVE", b"RF64"):
        return True
    if head[:4] in (b"RF64", b"OggS", b"fLaC", b"FORM", b".snd", b"caff", b"\x1aE\xdf\xa3") or head[:3] == b"ID3":
        return True
    if head[:5] == b"#!AMR" or head[4:8] == b"ftyp" or head[:4] == b"\x30\x26\xb2\x75":
        return True
    # MPEG audio frame sync (mp3 without ID3) or ADTS AAC
    return head[0] == 0xFF and (head[1] & 0xE0) == 0xE0


class _VettedResolver(AbstractResolver):
    """Resolves through the system, then refuses the name if any answer is not allowed."""

    def __init__(self, policy: UrlPolicy) -> None:
        self.policy = policy
        self._inner = ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        for answer in answers:
            address = parse_ip_literal(answer["host"])
            if address is None:
                raise UrlRejected(f"{host} resolved to something that is not an address: {answer['host']!r}")
            self.policy.check_address(address, host)
        return answers

    async def close(self) -> None:
        await self._inner.close()


class Downloader:
    def __init__(self, settings: DownloadSettings) -> None:
        self.settings = settings
        self.policy = UrlPolicy(settings.allowed_hosts, settings.allowed_networks, settings.file_roots)
        self._https = https_context(settings.tls_ca)
        # A share's file whose time of change is ahead of this machine's clock: what it looked like, and when.
        self._ahead: dict[str, tuple[tuple[int, int], float]] = {}
        settings.directory.mkdir(parents=True, exist_ok=True)

    def remove_orphans(self, in_use: Collection[str], older_than: float) -> list[Path]:
        """Delete the recordings (finished or partial) that no call holds (``in_use``: file names) and that
        nobody has written for ``older_than`` seconds; return them.

        A process killed mid-download leaves its partial file, and one killed (or whose lease was taken) between
        the download and the job's update leaves a recording no call names: each holds a caller's voice, kept
        for nothing. Files of other kinds in the directory are left alone."""
        removed = []
        cutoff = time.time() - older_than
        for path in self.settings.directory.iterdir():
            if path.suffix not in (RECORDING_SUFFIX, PARTIAL_SUFFIX) or path.name in in_use:
                continue
            try:
                if path.stat().st_mtime >= cutoff or not path.is_file():
                    continue
                path.unlink()
            except FileNotFoundError:  # another replica sharing the directory took it first
                continue
            removed.append(path)
        return removed

    def recordings_bytes(self) -> int:
        """What the recordings in RECORDING_DIR (finished and partial, this replica's and any other's) take."""
        total = 0
        with os.scandir(self.settings.directory) as entries:
            for entry in entries:
                if entry.name.endswith((RECORDING_SUFFIX, PARTIAL_SUFFIX)):
                    with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                        total += entry.stat().st_size
        return total

    def check_room(self, coming: int = 0) -> None:
        """Raise a waiting :class:`DownloadError` when writing ``coming`` more bytes would leave less than
        RECORDING_MIN_FREE_BYTES free where the recordings go (that disk often holds the job store too, which
        must never be the one that finds it full), or take the recordings past RECORDING_DIR_MAX_BYTES (a
        volume with a size limit of its own, such as a Kubernetes emptyDir, whose pod is evicted past it). It reads
        the directory and the disk: the downloads call it in a thread."""
        cap = self.settings.max_dir_bytes
        if cap > 0:
            if coming > cap:
                raise DownloadError(f"the recording is {_size(coming)}, more than all recordings may take together "
                                    f"({_size(cap)}, RECORDING_DIR_MAX_BYTES)", permanent=True)
            used = self.recordings_bytes()
            if used + coming > cap:
                needs = f"with the recording's {_size(coming)}, " if coming else ""
                raise DownloadError(
                    f"no room for the recording: {needs}the recordings in RECORDING_DIR would take more than the "
                    f"{_size(cap)} RECORDING_DIR_MAX_BYTES allows ({_size(used)} now); the call waits until there is "
                    "room", permanent=False, waiting=True)
        reserve = self.settings.min_free_bytes
        if reserve <= 0:
            return
        free = shutil.disk_usage(self.settings.directory).free
        if free - coming < reserve:
            needs = f"the recording's {_size(coming)} would leave" if coming else "there are"
            raise DownloadError(
                f"no room for the recording: {needs} {_size(max(0, free - coming))} free in RECORDING_DIR, which keeps "
                f"{_size(reserve)} free (RECORDING_MIN_FREE_BYTES); the call waits until there is room",
                permanent=False, waiting=True)

    async def fetch(self, url: str) -> Downloaded:
        """Stream ``url`` to a file with a generated name; raise :class:`DownloadError`."""
        s = self.settings
        s.directory.mkdir(parents=True, exist_ok=True)  # again: a volume mounted late, or a directory cleared
        await asyncio.to_thread(self.check_room)
        if urlsplit(url).scheme.lower() == "file":
            with _tracer.start_as_current_span("recording.copy") as span:
                try:
                    async with asyncio.timeout(s.total_timeout):
                        result = await self._copy(url)
                except TimeoutError as exc:
                    raise DownloadError(f"the copy from the share took longer than {s.total_timeout:.0f} s "
                                        "(RECORDING_TOTAL_TIMEOUT_SECONDS): a slow share", permanent=False) from exc
                span.set_attribute("recording.bytes", result.size)
                return result
        timeout = aiohttp.ClientTimeout(total=s.total_timeout, connect=s.connect_timeout, sock_read=s.read_timeout)
        connector = aiohttp.TCPConnector(resolver=_VettedResolver(self.policy), use_dns_cache=False, limit=4,
                                         ssl=self._https)
        with _tracer.start_as_current_span("recording.download") as span:
            async with aiohttp.ClientSession(timeout=timeout, connector=connector, trust_env=False,
                                             trace_configs=[client_trace_config()]) as session:
                try:
                    result = await self._follow(session, url)
                except UrlRejected as exc:
                    raise DownloadError(str(exc), permanent=True) from exc
                except asyncio.TimeoutError as exc:
                    raise DownloadError("the recorder timed out", permanent=False) from exc
                except aiohttp.ClientError as exc:
                    if untrusted := untrusted_certificate(exc, "the recorder"):
                        raise DownloadError(untrusted, permanent=True) from exc
                    raise DownloadError(f"the recorder could not be reached: {type(exc).__name__}: {exc}",
                                        permanent=False) from exc
            span.set_attribute("recording.bytes", result.size)
            return result

    async def _follow(self, session: aiohttp.ClientSession, url: str) -> Downloaded:
        for hop in range(self.settings.max_redirects + 1):
            scheme, host, _ = self.policy.check_url(url)
            async with session.get(url, allow_redirects=False, headers=self._credential(scheme, host)) as resp:
                if resp.status in _REDIRECTS:
                    location = resp.headers.get("Location")
                    if not location:
                        raise DownloadError(f"HTTP {resp.status} without a Location", permanent=True)
                    url = urljoin(url, location)
                    log.info("redirect %d to %s", hop + 1, shown_url(url))
                    continue
                if resp.status in _PERMANENT_HTTP:
                    hint = _EXPIRED_LINK_HINT if resp.status in _EXPIRED_LINK_HTTP else ""
                    raise DownloadError(f"the recorder answered HTTP {resp.status} for the recording{hint}",
                                        permanent=True, not_there=resp.status in _NOT_THERE_HTTP)
                if resp.status != 200:
                    raise DownloadError(f"the recorder answered HTTP {resp.status}",
                                        permanent=resp.status < 500 and resp.status != 429)
                length = resp.content_length
                if length is not None and length > self.settings.max_bytes:
                    raise DownloadError(f"the recording is {length} bytes, over the {self.settings.max_bytes}-byte limit",
                                        permanent=True)
                if length is not None:
                    await asyncio.to_thread(self.check_room, length)
                return await self._save(resp.content.iter_chunked(_CHUNK_BYTES), resp.content_type)
        raise DownloadError(f"more than {self.settings.max_redirects} redirects", permanent=True)

    def _credential(self, scheme: str, host: str) -> dict[str, str] | None:
        """The Authorization header for a request to ``host``: RECORDING_AUTHORIZATION goes to the hosts of
        RECORDING_AUTHORIZATION_HOSTS only (not to where they redirect: a recording store's signed link refuses a
        second credential, and no other host is to see it), and over https only, unless the host is this machine."""
        credential = self.settings.authorization_for(host)
        if not credential:
            return None
        if scheme != "https" and not is_this_machine(host):
            raise DownloadError(f"the recording link is plain http to {host}, which gets RECORDING_AUTHORIZATION: "
                                "the credential is sent over https only", permanent=True)
        return {"Authorization": credential}

    async def _copy(self, url: str) -> Downloaded:
        """Copy the recording a ``file:`` URL names (on a share under RECORDING_FILE_ROOTS) into RECORDING_DIR, as a
        download would: the original is never changed or deleted.

        A recorder may post the webhook while it still writes the file (or its copy to the share is still under
        way): the copy waits until the file has not changed for RECORDING_FILE_SETTLE_SECONDS. A file that keeps
        changing meanwhile, or changes while it is copied, is a :class:`DownloadError` with ``still_written_for``:
        the call looks again then, and its download slot goes to another call meanwhile."""
        try:
            path = self.policy.file_path(url)
        except UrlRejected as exc:
            raise DownloadError(str(exc), permanent=True) from exc
        settle = self.settings.file_settle_seconds
        await self._until_settled(path, settle)
        source = await asyncio.to_thread(self._open_on_share, path)  # a share can be slow: not on the loop
        with source:
            before = _version(os.fstat(source.fileno()))

            async def chunks() -> AsyncIterator[bytes]:
                while chunk := await asyncio.to_thread(source.read, _CHUNK_BYTES):
                    yield chunk

            copied = await self._save(chunks(), "")
            if _version(await asyncio.to_thread(os.fstat, source.fileno())) == before:
                return copied
        copied.path.unlink(missing_ok=True)
        again = max(settle, _MIN_SETTLE_AFTER_CHANGE)
        raise DownloadError(f"{path} changed while it was copied: it is still being written, and is copied again "
                            f"once it has not changed for {again:.1f} s (RECORDING_FILE_SETTLE_SECONDS)",
                            permanent=False, still_written_for=again)

    async def _until_settled(self, path: str, settle: float) -> None:
        """Return once the file at ``path`` has not changed for ``settle`` seconds; raise a :class:`DownloadError`
        with ``still_written_for`` while it has (or may have). Its time of change tells, unless that is ahead of this
        machine's clock (a share's server may keep another time): then what the file looked like is kept here, and
        the file is copied once a later look, ``settle`` seconds on or more, finds it the same. The call holds no
        download slot in between. A file that is not there is left to the open, which says so."""
        if settle <= 0:
            return
        seen = await asyncio.to_thread(_version_at, path)
        if seen is None:
            return
        age = time.time() - seen[1] / 1e9
        if age >= settle:
            return
        if age >= 0:
            raise DownloadError(f"{path} is still being written: it changed {age:.1f} s ago; it is copied once it "
                                f"has not changed for {settle:.1f} s (RECORDING_FILE_SETTLE_SECONDS)",
                                permanent=False, still_written_for=settle - age)
        before = self._ahead.pop(path, None)
        now = time.monotonic()
        if before is not None and before[0] == seen:
            unchanged_for = now - before[1]
            if unchanged_for >= settle:
                trace.get_current_span().set_attribute("recording.unchanged_seconds", unchanged_for)
                return
            self._ahead[path] = before
            look_again_in = settle - unchanged_for
        else:
            self._ahead[path] = (seen, now)
            while len(self._ahead) > _AHEAD_KEPT:  # calls that failed or moved on meanwhile: the oldest go
                del self._ahead[next(iter(self._ahead))]
            look_again_in = settle
        changed = before is not None and before[0] != seen
        why = ("is still being written: it changed since it was looked at" if changed
               else f"is dated {-age:.1f} s ahead of this machine's clock, so its time of change cannot tell whether "
                    "it is still being written")
        raise DownloadError(f"{path} {why}: it is copied once it is seen unchanged for {settle:.1f} s "
                            "(RECORDING_FILE_SETTLE_SECONDS)", permanent=False, still_written_for=look_again_in,
                            seen_changing=changed)

    def _open_on_share(self, path: str) -> BinaryIO:
        """Open the recording at ``path`` once its links are followed, if it is still under RECORDING_FILE_ROOTS, is
        a plain file, fits the size cap and the room there is; raise :class:`DownloadError` otherwise."""
        real = os.path.realpath(path)
        roots = [root for root in self.settings.file_roots if under(real, (os.path.realpath(root),))]
        if not roots:
            raise DownloadError(f"{path} leads to {real}, outside RECORDING_FILE_ROOTS", permanent=True)
        try:  # without blocking: a FIFO on the share would otherwise hold the open until someone writes to it
            source = os.fdopen(os.open(real, os.O_RDONLY | os.O_NONBLOCK), "rb")
        except FileNotFoundError as exc:
            if unmounted := share_not_mounted(roots[0]):
                raise DownloadError(f"there is no file {path}: {unmounted}; the call waits for the share",
                                    permanent=False, waiting=True) from exc
            raise DownloadError(f"there is no file {path}", permanent=True, not_there=True) from exc
        except IsADirectoryError as exc:
            raise DownloadError(f"{path} is not a file", permanent=True) from exc
        except OSError as exc:  # a share that does not answer may again; a file we may not read will not
            raise DownloadError(f"{path} cannot be read: {exc.strerror}",
                                permanent=isinstance(exc, PermissionError)) from exc
        try:
            info = os.fstat(source.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise DownloadError(f"{path} is not a file", permanent=True)
            if info.st_size > self.settings.max_bytes:
                raise DownloadError(f"the recording is {info.st_size} bytes, over the {self.settings.max_bytes}-byte "
                                    "limit", permanent=True)
            self.check_room(info.st_size)
        except BaseException:
            source.close()
            raise
        return source

    async def _save(self, chunks: AsyncIterator[bytes], content_type: str) -> Downloaded:
        path = self.settings.directory / f"{uuid.uuid4().hex}{RECORDING_SUFFIX}"
        partial = path.with_suffix(PARTIAL_SUFFIX)
        size = checked = 0
        head = b""
        try:
            with partial.open("wb") as out:
                async for chunk in chunks:
                    if len(head) < 16:
                        head += chunk[: 16 - len(head)]
                        if len(head) >= 16 and not looks_like_audio(head):
                            served = f"Content-Type {content_type!r}, " if content_type else ""
                            raise DownloadError(f"the recording is not audio ({served}starts with {head[:8]!r})",
                                                permanent=True)
                    size += len(chunk)
                    if size > self.settings.max_bytes:
                        raise DownloadError(f"the recording is over the {self.settings.max_bytes}-byte limit", permanent=True)
                    if size >= checked + ROOM_CHECK_BYTES:  # a recording of unknown length, or a disk others fill
                        await asyncio.to_thread(self.check_room)
                        checked = size
                    write_recording(out, chunk)
                await asyncio.to_thread(write_recording, out)  # the sync to disk can take seconds: not on the loop
            if size == 0:
                raise DownloadError("the recording is empty", permanent=True)
            if not looks_like_audio(head):
                raise DownloadError(f"the recording is not audio (starts with {head[:8]!r})", permanent=True)
            partial.replace(path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return Downloaded(path, size, content_type)


def share_not_mounted(root: str) -> str | None:
    """What says that the share at ``root`` (a directory of RECORDING_FILE_ROOTS) is not mounted: the directory is
    missing, or empty, as a mount point is without its share (None: it looks mounted). A recording the recorder
    named there cannot be told missing from the share's absence, so the call waits for the share."""
    try:
        with os.scandir(root) as entries:
            if next(entries, None) is None:
                return f"RECORDING_FILE_ROOTS directory {root} is empty (is the share mounted?)"
    except FileNotFoundError:
        return f"RECORDING_FILE_ROOTS directory {root} does not exist (is the share mounted?)"
    except OSError as exc:  # a share that does not answer (ESTALE, EIO) or a directory we may not read
        return f"RECORDING_FILE_ROOTS directory {root} cannot be read ({exc.strerror})"
    return None


def _version(info: os.stat_result) -> tuple[int, int]:
    """What tells that a file was written to: its size and its time of change (ns)."""
    return info.st_size, info.st_mtime_ns


def _version_at(path: str) -> tuple[int, int] | None:
    try:
        return _version(os.stat(path))
    except OSError:  # not there (yet), or not readable: the open says which
        return None


def write_recording(out: BinaryIO, chunk: bytes | None = None) -> None:
    """Write ``chunk`` to the recording, or flush and sync it to disk; a full disk is a waiting
    :class:`DownloadError`, any other failure to write a transient one."""
    try:
        if chunk is not None:
            out.write(chunk)
        else:
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        if exc.errno in NO_ROOM_ERRNOS:
            raise DownloadError(f"no room for the recording: the disk of RECORDING_DIR is full ({exc.strerror}); "
                                "the call waits until there is room", permanent=False, waiting=True) from exc
        raise DownloadError(f"the recording could not be written to RECORDING_DIR: {exc}", permanent=False) from exc
