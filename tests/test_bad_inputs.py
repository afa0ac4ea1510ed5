"""The bad-input corpus: each hostile or broken input, its documented outcome, and nothing lost.

Webhook-level inputs are refused before anything is stored (the README's table
lists each outcome). Download-level inputs are accepted, then fail (or wait)
with the reason in the status API. After every case the service still answers a
good webhook and no half-written recording is left behind. Audio that only the
transcriber can judge (truncated MP3, silence, noise) is in test_end_to_end.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from callmesh.standins import new_webhook_secret, signed_headers
from tests.hostile_recorder import HostileRecorder
from tests.ingest_harness import SECRET, Ingest, post, running_ingest, wait_for_state

GOOD_URL = "http://recorder.example/recordings/a.wav"


def body(call_id: object = "bad-1", url: object = GOOD_URL, **extra: object) -> str:
    return json.dumps({"call_id": call_id, "recording_url": url, **extra})


@dataclass(frozen=True)
class Refused:
    """A webhook that is refused with ``status`` and a detail containing ``reason``."""

    name: str
    payload: bytes | str
    status: int
    reason: str
    content_type: str = "application/json"
    headers: dict[str, str] | None = field(default=None)  # None: correctly signed


def signed_with(secret: str, payload: str, **kw: object) -> dict[str, str]:
    return signed_headers(secret, payload.encode(), **kw)  # type: ignore[arg-type]


WEBHOOK_CORPUS = [
    Refused("malformed JSON", "{\"call_id\": ", 400, "not valid JSON"),
    Refused("signed body that is not UTF-8", b"\xff\xfe{\x00}", 401, "cannot be checked",
            headers=signed_with(SECRET, body())),
    Refused("JSON array instead of object", json.dumps(["call_id"]), 422, "JSON object"),
    Refused("form-encoded body", "call_id=1", 415, "application/json", "application/x-www-form-urlencoded"),
    Refused("body over 64 KiB", body(pad="x" * 70_000), 413, "65536"),
    Refused("missing call_id", json.dumps({"recording_url": GOOD_URL}), 422, "call_id"),
    Refused("missing recording_url", json.dumps({"call_id": "c"}), 422, "recording_url"),
    Refused("call_id path traversal", body("../../etc/passwd"), 422, "call_id"),
    Refused("call_id made of dots", body(".."), 422, "call_id"),
    Refused("call_id with a slash", body("a/b"), 422, "call_id"),
    Refused("call_id in unicode", body("appel-\u00e9t\u00e9"), 422, "call_id"),
    Refused("call_id with a NUL byte", body("a\u0000b"), 422, "call_id"),
    Refused("call_id of 129 characters", body("c" * 129), 422, "call_id"),
    Refused("call_id that is a number", body(12345), 422, "call_id"),
    Refused("file:// URL", body(url="file:///etc/passwd"), 422, "http or https"),
    Refused("gopher:// URL", body(url="gopher://127.0.0.1:25/_HELO"), 422, "http or https"),
    Refused("URL with credentials", body(url="http://user:pw@recorder.example/a.wav"), 422, "credentials"),
    Refused("cloud metadata address", body(url="http://169.254.169.254/latest/meta-data/"), 422, "169.254.169.254"),
    Refused("private address", body(url="http://10.1.2.3/a.wav"), 422, "10.1.2.3"),
    Refused("loopback address", body(url="http://127.0.0.1:8080/a.wav"), 422, "127.0.0.1"),
    Refused("IPv6 loopback", body(url="http://[::1]/a.wav"), 422, "::1"),
    Refused("IPv4-mapped IPv6 loopback", body(url="http://[::ffff:127.0.0.1]/a.wav"), 422, "127.0.0.1"),
    Refused("decimal IP spelling", body(url="http://2130706433/a.wav"), 422, "127.0.0.1"),
    Refused("octal IP spelling", body(url="http://0177.0.0.1/a.wav"), 422, "127.0.0.1"),
    Refused("hex IP spelling", body(url="http://0x7f.0.0.1/a.wav"), 422, "127.0.0.1"),
    Refused("short IP spelling", body(url="http://127.1/a.wav"), 422, "127.0.0.1"),
    Refused("unspecified address", body(url="http://0.0.0.0/a.wav"), 422, "0.0.0.0"),
    Refused("multicast address", body(url="http://224.0.0.1/a.wav"), 422, "224.0.0.1"),
    Refused("reserved address", body(url="http://240.0.0.1/a.wav"), 422, "240.0.0.1"),
    Refused("URL that is not a URL", body(url="http://[::1/a.wav"), 422, "not a valid URL"),
    Refused("language as a name", body(language="Spanish"), 422, "language must be"),
    Refused("language as a number", body(language=34), 422, "language must be"),
    Refused("language with an empty region", body(language="es-"), 422, "language must be"),
    Refused("URL over 2048 characters", body(url="http://recorder.example/" + "a" * 2100), 422, "2048"),
    Refused("unsigned webhook", body(), 401, "missing signature", headers={}),
    Refused("signed with an unknown secret", body(), 401, "no signature matches",
            headers=signed_with(new_webhook_secret(), body())),
    Refused("expired signature", body(), 401, "stale", headers=signed_with(SECRET, body(), timestamp=time.time() - 600)),
    Refused("signature of another body", body(), 401, "no signature matches",
            headers=signed_with(SECRET, body("other"))),
]


@pytest_asyncio.fixture
async def strict_ingest(tmp_path: Path) -> AsyncIterator[Ingest]:
    """Production-like: any host name, no private network allowed."""
    async with running_ingest(tmp_path, allowed_hosts=(), allowed_networks=()) as ingest:
        yield ingest


@pytest_asyncio.fixture
async def hostile() -> AsyncIterator[HostileRecorder]:
    r = await HostileRecorder(big_bytes=2 * 1024 * 1024).start()
    yield r
    await r.stop()


def assert_nothing_half_written(tmp_path: Path) -> None:
    assert not list((tmp_path / "recordings").glob("*.partial"))


async def assert_still_serving(ingest: Ingest, url: str = GOOD_URL) -> None:
    status, _ = await post(ingest.url, body("still-serving", url))
    assert status == 202


def test_the_corpus_has_at_least_thirty_inputs() -> None:
    assert len(WEBHOOK_CORPUS) + len(DOWNLOAD_CORPUS) >= 30
    assert len({c.name for c in WEBHOOK_CORPUS}) == len(WEBHOOK_CORPUS)


@pytest.mark.parametrize("case", WEBHOOK_CORPUS, ids=lambda c: c.name)
async def test_bad_webhook_is_refused_with_its_reason_and_nothing_is_stored(strict_ingest: Ingest, case: Refused,
                                                                            tmp_path: Path) -> None:
    status, problem = await post(strict_ingest.url, case.payload, case.content_type, headers=case.headers)
    assert (status, problem["status"]) == (case.status, case.status), problem
    assert case.reason in problem["detail"], problem["detail"]
    assert await strict_ingest.store.counts() == {}
    await assert_still_serving(strict_ingest)
    assert_nothing_half_written(tmp_path)


@dataclass(frozen=True)
class Fetched:
    """A webhook that is accepted, then ends in ``state`` at ``stage`` with ``reason`` in the error."""

    name: str
    path: str
    state: str
    stage: str
    reason: str


DOWNLOAD_CORPUS = [
    Fetched("recorder that trickles bytes", "/trickle", "failed", "downloading", "timed out"),
    Fetched("3 redirects (the limit)", "/hops/3", "transcribing", "transcribing", "UNAVAILABLE"),
    Fetched("4 redirects", "/hops/4", "failed", "downloading", "more than 3 redirects"),
    Fetched("redirect to the metadata address", "/to/169.254.169.254", "failed", "downloading", "169.254.169.254"),
    Fetched("redirect to a private address", "/to/10.0.0.7", "failed", "downloading", "10.0.0.7"),
    Fetched("redirect to a non-allow-listed host", "/to/internal.example", "failed", "downloading",
            "RECORDING_ALLOWED_HOSTS"),
    Fetched("body over the size cap, no Content-Length", "/big", "failed", "downloading", "byte limit"),
    Fetched("HTML instead of audio", "/html", "failed", "downloading", "not audio"),
    Fetched("empty file", "/empty", "failed", "downloading", "empty"),
    Fetched("recording not found", "/error/404", "failed", "downloading", "HTTP 404"),
    Fetched("recorder keeps failing", "/error/503", "failed", "downloading", "gave up after 2 attempts"),
]


@pytest.mark.parametrize("case", DOWNLOAD_CORPUS, ids=lambda c: c.name)
async def test_bad_recording_ends_with_its_reason_in_the_status(ingest: Ingest, hostile: HostileRecorder,
                                                                case: Fetched, tmp_path: Path) -> None:
    call_id = "fetch-" + case.path.strip("/").replace("/", "-")
    status, _ = await post(ingest.url, body(call_id, hostile.url + case.path))
    assert status == 202
    final = await wait_for_state(ingest.url, call_id, {case.state}, timeout=30)
    for _ in range(100):  # a call waiting at a stage shows its error once the first attempt is over
        if final["error"]:
            break
        await asyncio.sleep(0.1)
        final = await wait_for_state(ingest.url, call_id, {case.state})
    assert final["error"]["stage"] == case.stage
    assert case.reason in final["error"]["message"], final["error"]
    await assert_still_serving(ingest, hostile.url + "/hops/0")
    assert_nothing_half_written(tmp_path)


async def test_name_that_resolves_to_loopback_is_refused_at_download(strict_ingest: Ingest,
                                                                     hostile: HostileRecorder) -> None:
    port = hostile.url.rsplit(":", 1)[1]
    status, _ = await post(strict_ingest.url, body("dns-1", f"http://localhost:{port}/hops/0"))
    assert status == 202  # a name cannot be judged without DNS: it is judged at download time
    final = await wait_for_state(strict_ingest.url, "dns-1", {"failed"})
    assert final["error"]["stage"] == "downloading"
    assert "localhost is 127.0.0.1" in final["error"]["message"] or "localhost is ::1" in final["error"]["message"]
    assert final["attempts"] == 1  # permanent: not retried
    assert hostile.hits == {}  # the connection was never made
