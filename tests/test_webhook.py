"""The webhook and status API on a real aiohttp server on 127.0.0.1 port 0."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from callmesh.mesh import new_mesh
from callmesh.standins import Recorder, signed_headers
from services.common.lifecycle import start_site
from services.ingest.api import _webhooks as webhook_outcomes_counter
from services.ingest.api import create_app
from tests.ingest_harness import SECRET, UNUSED, VERIFIER, Ingest, post, running_ingest, wait_for, wait_for_state
from tests.prometheus import metric
from tests.spans import SPANS
from tests.tls import company_ca


def webhook_outcomes() -> collections.Counter[str]:
    """What ingest counts for ``callmesh_webhooks_total``, by outcome."""
    return collections.Counter(webhook_outcomes_counter)


def server_spans(path: str) -> list[ReadableSpan]:
    return [s for s in SPANS.get_finished_spans()
            if s.kind == trace.SpanKind.SERVER and (s.attributes or {}).get("url.path") == path]

async def test_valid_webhook_is_acknowledged_with_the_status_url(ingest: Ingest) -> None:
    status, body = await post(ingest.url, json.dumps({"call_id": "c-1", "recording_url": "http://127.0.0.1:1/a.wav"}))
    assert status == 202
    assert body["status_url"] == f"{ingest.url}/v1/calls/c-1"
    assert body["duplicate"] is False
    assert len(body["trace_id"]) == 32
    assert (await ingest.store.get("c-1")) is not None


async def test_a_sip_call_id_is_taken_as_the_call_id_and_its_status_and_retry_work(
        ingest: Ingest, recorder: Recorder) -> None:
    call_id = "a84b4c76e66710@pc33.atlanta.example"  # what many PBXs and recorders name a call by
    status, body = await post(ingest.url, json.dumps({"call_id": call_id,
                                                      "recording_url": recorder.url_for("missing.wav")}))
    assert status == 202 and body["call_id"] == call_id
    failed = await wait_for_state(ingest.url, call_id, {"failed"})
    assert failed["call_id"] == call_id
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{ingest.url}/v1/calls/{call_id}:retry") as resp:
            assert resp.status == 202
        async with session.get(f"{ingest.url}/calls/{urllib.parse.quote(call_id)}") as resp:
            assert resp.status == 200 and call_id in await resp.text()


@pytest.mark.parametrize(("sent", "kept"), [("es", "es"), ("ES", "es"), ("es-MX", "es"), ("pt_BR", "pt"),
                                             ("zh-Hant-TW", "zh")])
async def test_the_language_hint_is_taken_as_a_code_or_as_a_locale_whose_language_counts(
        ingest: Ingest, sent: str, kept: str) -> None:
    status, _ = await post(ingest.url, json.dumps({"call_id": "lang-1", "recording_url": "http://127.0.0.1:1/a.wav",
                                                   "language": sent}))
    assert status == 202
    job = await ingest.store.get("lang-1")
    assert job is not None and job.options.language == kept


async def test_webhook_span_continues_the_recorders_trace(ingest: Ingest) -> None:
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    body = json.dumps({"call_id": "traced-1", "recording_url": "http://127.0.0.1:1/a.wav"})
    headers = {**signed_headers(SECRET, body.encode()), "traceparent": f"00-{trace_id}-{parent_id}-01"}
    SPANS.clear()
    status, answer = await post(ingest.url, body, headers=headers)
    assert status == 202 and answer["trace_id"] == trace_id
    [span] = server_spans("/v1/calls")
    assert span.name == "POST /v1/calls"
    assert format(span.context.trace_id, "032x") == trace_id
    assert span.parent is not None and format(span.parent.span_id, "016x") == parent_id
    assert span.attributes["http.route"] == "/v1/calls"
    assert span.attributes["http.response.status_code"] == 202
    assert span.status.is_ok


async def test_refused_webhook_span_carries_its_status(ingest: Ingest) -> None:
    SPANS.clear()
    status, _ = await post(ingest.url, "{}", headers={})
    assert status == 401
    [span] = server_spans("/v1/calls")
    assert span.attributes["http.response.status_code"] == 401


async def test_a_request_that_crashes_leaves_an_error_span() -> None:
    from aiohttp import web

    from services.common.telemetry import server_span_middleware

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("disk on fire")

    app = web.Application(middlewares=[server_span_middleware()])
    app.router.add_get("/broken", broken)
    runner, port = await start_site(app, "127.0.0.1", 0)
    SPANS.clear()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/broken") as resp:
                assert resp.status == 500
    finally:
        await runner.cleanup()
    [span] = server_spans("/broken")
    assert span.status.status_code == trace.StatusCode.ERROR
    assert [e.attributes["exception.message"] for e in span.events] == ["disk on fire"]


async def test_health_probes_make_no_spans(ingest: Ingest) -> None:
    SPANS.clear()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{ingest.url}/healthz") as resp:
            assert resp.status == 200
        async with session.get(f"{ingest.url}/v1/calls/nobody") as resp:
            assert resp.status == 404
    assert server_spans("/healthz") == []
    [span] = server_spans("/v1/calls/nobody")
    assert span.name == "GET /v1/calls/{call_id}" and span.attributes["http.response.status_code"] == 404


async def test_the_recorders_metadata_is_kept_with_the_call(ingest: Ingest) -> None:
    metadata = {"agent_id": "A-117", "queue": "billing", "ani": "+34 600 123 456"}
    status, _ = await post(ingest.url, json.dumps({"call_id": "meta-1", "recording_url": "http://127.0.0.1:1/a.wav",
                                                   "metadata": metadata}))
    assert status == 202
    assert (await ingest.store.get("meta-1")).options.metadata == metadata
    shown = await wait_for(ingest.url, "meta-1", lambda s: True)
    assert shown["options"]["metadata"] == metadata


async def test_same_call_posted_again_is_the_same_job(ingest: Ingest) -> None:
    payload = json.dumps({"call_id": "dup-1", "recording_url": "http://127.0.0.1:1/a.wav"})
    results = await asyncio.gather(*(post(ingest.url, payload) for _ in range(3)))
    assert [s for s, _ in results] == [202, 202, 202]
    assert sorted(b["duplicate"] for _, b in results) == [False, True, True]
    assert sum((await ingest.store.counts()).values()) == 1


@pytest.mark.parametrize(("body", "content_type", "expected"), [
    ("{not json", "application/json", 400),
    ("call_id=1", "application/x-www-form-urlencoded", 415),
    (json.dumps({"recording_url": "http://127.0.0.1/a.wav"}), "application/json", 422),
    (json.dumps({"call_id": "x"}), "application/json", 422),
    (json.dumps(["call_id", "recording_url"]), "application/json", 422),
    (json.dumps({"call_id": "../../etc/passwd", "recording_url": "http://127.0.0.1/a.wav"}), "application/json", 422),
    (json.dumps({"call_id": "..", "recording_url": "http://127.0.0.1/a.wav"}), "application/json", 422),
    (json.dumps({"call_id": "ok", "recording_url": "file:///etc/passwd"}), "application/json", 422),
    (json.dumps({"call_id": "ok", "recording_url": "http://169.254.169.254/latest"}), "application/json", 422),
    (json.dumps({"call_id": "ok", "recording_url": "http://user:pw@127.0.0.1/a.wav"}), "application/json", 422),
    (json.dumps({"call_id": "x" * 64 * 1024, "recording_url": "http://127.0.0.1/a.wav"}), "application/json", 413),
    *((json.dumps({"call_id": "ok", "recording_url": "http://127.0.0.1:1/a.wav", "metadata": metadata}),
       "application/json", 422)
      for metadata in (["agent", "A-1"], {"agent": 117}, {"agent id": "A-1"}, {"": "x"}, {"note": "x" * 1025},
                       {f"k{i}": "v" for i in range(33)},
                       {"note": "\ud800"}, {"note": "a\u0000b"})),  # JSON escapes of what is not text
])
async def test_malformed_webhook_gets_a_clear_4xx_and_stores_nothing(ingest: Ingest, body: str, content_type: str,
                                                                     expected: int) -> None:
    status, problem = await post(ingest.url, body, content_type)
    assert status == expected
    assert problem["status"] == expected and problem["detail"]
    assert await ingest.store.counts() == {}
    status, _ = await post(ingest.url, json.dumps({"call_id": "after", "recording_url": "http://127.0.0.1:1/a.wav"}))
    assert status == 202  # still serving


async def test_recording_that_is_not_audio_fails_with_the_reason(ingest: Ingest, recorder: Recorder) -> None:
    await post(ingest.url, json.dumps({"call_id": "text-1", "recording_url": recorder.url_for("not-audio.txt")}))
    status = await wait_for_state(ingest.url, "text-1", {"failed"})
    assert status["error"]["stage"] == "downloading"
    assert "not audio" in status["error"]["message"]
    assert list(status["stages"]) == ["received", "downloading", "failed"]


SIGNED_LINK = "X-Amz-Credential=AKIAEXAMPLE%2F20261127&X-Amz-Signature=0f1e2d3c4b5a69788796a5b4c3d2e1f0"


async def test_a_signed_recording_link_stays_out_of_logs_traces_and_the_status_api(ingest: Ingest, caplog: pytest.LogCaptureFixture,
                                                                    finished_spans: InMemorySpanExporter) -> None:
    """The recorder's link carries a token and redirects to a presigned URL, as recording stores do."""
    async def link(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"/store/call.wav?{SIGNED_LINK}")

    async def stored(request: web.Request) -> web.Response:
        return web.Response(body=b"RIFF\x24\x08\x00\x00WAVEfmt " + bytes(2000), content_type="audio/wav")

    app = web.Application()
    app.router.add_get("/link", link)
    app.router.add_get("/store/call.wav", stored)
    runner, port = await start_site(app, "127.0.0.1", 0, access_log=None)  # the recorder's own log is not ours
    caplog.set_level(logging.DEBUG)
    try:
        await post(ingest.url, json.dumps({"call_id": "signed-1",
                                           "recording_url": f"http://127.0.0.1:{port}/link?token=opaque-token-123"}))
        status = await wait_for_state(ingest.url, "signed-1", {"transcribing"})
    finally:
        await runner.cleanup()
    told = caplog.text + json.dumps(status) + " ".join(str(value) for span in finished_spans.get_finished_spans()
                                                       for value in (span.attributes or {}).values())
    assert status["recording_url"] == f"http://127.0.0.1:{port}/link?token=REDACTED"  # the status API
    assert "/store/call.wav?X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED" in caplog.text
    assert "/link?token=REDACTED" in told  # the download's span, with the URL's shape
    for secret in ("AKIAEXAMPLE", "0f1e2d3c4b5a", "opaque-token-123"):
        assert secret not in told


RECORDER_CREDENTIAL = "Basic QUMwMTIzOnNlY3JldC10b2tlbg=="


@pytest.fixture
async def guarded_recorder() -> AsyncIterator[tuple[int, list[tuple[str, str | None]]]]:
    """A recorder that wants a credential and redirects to a signed link on another host, as Twilio's API does
    (to S3): ``/recording`` answers 401 without RECORDER_CREDENTIAL, and redirects to ``localhost``'s
    ``/signed``, which refuses any Authorization header (S3: "only one auth mechanism allowed"). Yields its port
    and each request's (path, Authorization)."""
    seen: list[tuple[str, str | None]] = []

    async def recording(request: web.Request) -> web.Response:
        seen.append((request.path, request.headers.get("Authorization")))
        if request.headers.get("Authorization") != RECORDER_CREDENTIAL:
            return web.Response(status=401)
        raise web.HTTPFound(f"http://localhost:{request.url.port}/signed?X-Amz-Signature=abc")

    async def signed(request: web.Request) -> web.Response:
        seen.append((request.path, request.headers.get("Authorization")))
        if "Authorization" in request.headers:
            return web.Response(status=400, text="Only one auth mechanism allowed")
        return web.Response(body=b"RIFF\x24\x08\x00\x00WAVEfmt " + bytes(2000), content_type="audio/wav")

    app = web.Application()
    app.router.add_get("/recording", recording)
    app.router.add_get("/signed", signed)
    runner, port = await start_site(app, "127.0.0.1", 0, access_log=None)
    yield port, seen
    await runner.cleanup()


async def download_with_credential_for(tmp_path: Path, hosts: tuple[str, ...], port: int) -> dict:
    """A call whose link is the guarded recorder's ``/recording``, through an ingest that has RECORDER_CREDENTIAL
    for ``hosts``: its status once it got past the download or failed."""
    async with running_ingest(tmp_path, authorization=RECORDER_CREDENTIAL, authorization_hosts=hosts) as ingest:
        await post(ingest.url, json.dumps({"call_id": "auth-1", "recording_url": f"http://127.0.0.1:{port}/recording"}))
        return await wait_for(ingest.url, "auth-1", lambda s: "transcribing" in s["stages"] or s["status"] == "failed")


async def test_the_recording_credential_goes_to_the_recorders_host_and_not_where_it_redirects(
        tmp_path: Path, guarded_recorder: tuple[int, list[tuple[str, str | None]]]) -> None:
    port, seen = guarded_recorder
    status = await download_with_credential_for(tmp_path, ("127.0.0.1",), port)
    assert "transcribing" in status["stages"]
    assert seen == [("/recording", RECORDER_CREDENTIAL), ("/signed", None)]


async def test_the_recording_credential_goes_to_no_host_it_does_not_name(
        tmp_path: Path, guarded_recorder: tuple[int, list[tuple[str, str | None]]]) -> None:
    port, seen = guarded_recorder
    status = await download_with_credential_for(tmp_path, ("recorder.example",), port)
    assert seen == [("/recording", None)] and "HTTP 401" in status["error"]["message"]


async def test_the_recording_credential_is_not_sent_over_plain_http_to_another_machine(tmp_path: Path) -> None:
    async with running_ingest(tmp_path, authorization=RECORDER_CREDENTIAL, authorization_hosts=("recorder.example",),
                              allowed_hosts=("recorder.example",)) as ingest:
        await post(ingest.url, json.dumps({"call_id": "auth-3", "recording_url": "http://recorder.example/r.wav"}))
        status = await wait_for_state(ingest.url, "auth-3", {"failed"})
    assert "the credential is sent over https only" in status["error"]["message"]


async def test_an_https_recorder_whose_certificate_the_companys_ca_issued_is_trusted_through_outbound_tls_ca(
        tmp_path: Path, audio_dir: Path) -> None:
    ca = company_ca(tmp_path / "ca")
    recorder = await Recorder(audio_dir).start(ssl_context=ca.server)
    try:
        async with running_ingest(tmp_path, tls_ca=str(ca.authority.cert)) as ingest:
            await post(ingest.url, json.dumps({"call_id": "tls-1", "recording_url": recorder.url_for("es-billing-angry.wav")}))
            await wait_for(ingest.url, "tls-1", lambda s: "transcribing" in s["stages"])
    finally:
        await recorder.stop()


async def test_a_recorder_certificate_nobody_trusts_fails_the_call_naming_outbound_tls_ca(
        tmp_path: Path, audio_dir: Path) -> None:
    recorder = await Recorder(audio_dir).start(ssl_context=company_ca(tmp_path / "ca").server)
    try:
        async with running_ingest(tmp_path) as ingest:
            await post(ingest.url, json.dumps({"call_id": "tls-2", "recording_url": recorder.url_for("es-billing-angry.wav")}))
            status = await wait_for_state(ingest.url, "tls-2", {"failed"})
    finally:
        await recorder.stop()
    assert "the recorder's TLS certificate is not trusted" in status["error"]["message"]
    assert "OUTBOUND_TLS_CA" in status["error"]["message"] and status["attempts"] == 1


async def test_missing_recording_fails_at_once(ingest: Ingest, recorder: Recorder) -> None:
    await post(ingest.url, json.dumps({"call_id": "gone-1", "recording_url": recorder.url_for("nope.wav")}))
    status = await wait_for_state(ingest.url, "gone-1", {"failed"})
    assert "HTTP 404" in status["error"]["message"]
    assert status["attempts"] == 1


@pytest.fixture
async def expiring_store() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """A recording store whose links have all expired (403, as S3 answers): ``/expired`` answers at once,
    ``/held`` once the event is set."""
    release = asyncio.Event()

    async def expired(request: web.Request) -> web.Response:
        if request.path == "/held":
            await release.wait()
        return web.Response(status=403, text="Request has expired")

    app = web.Application()
    app.router.add_get("/expired", expired)
    app.router.add_get("/held", expired)
    runner, port = await start_site(app, "127.0.0.1", 0, access_log=None)
    yield f"http://127.0.0.1:{port}", release
    release.set()
    await runner.cleanup()


async def test_a_call_whose_link_expired_is_downloaded_from_the_new_link_sent_again(
        ingest: Ingest, recorder: Recorder, expiring_store: tuple[str, asyncio.Event]) -> None:
    store_url, _ = expiring_store
    await post(ingest.url, json.dumps({"call_id": "expired-1", "recording_url": f"{store_url}/expired"}))
    failed = await wait_for_state(ingest.url, "expired-1", {"failed"})
    assert "HTTP 403" in failed["error"]["message"] and "send the webhook again with a new link" in failed["error"]["message"]
    relinked_before = webhook_outcomes()["relinked"]
    fresh = recorder.url_for("es-billing-angry.wav")
    status, body = await post(ingest.url, json.dumps({"call_id": "expired-1", "recording_url": fresh}))
    assert (status, body["duplicate"]) == (202, True)
    assert webhook_outcomes()["relinked"] == relinked_before + 1
    status = await wait_for(ingest.url, "expired-1", lambda s: "transcribing" in s["stages"])
    assert status["recording_url"] == fresh and "es-billing-angry.wav" in recorder.requests


async def test_a_download_that_fails_after_a_new_link_came_tries_the_new_link_at_once(
        ingest: Ingest, recorder: Recorder, expiring_store: tuple[str, asyncio.Event]) -> None:
    store_url, release = expiring_store
    await post(ingest.url, json.dumps({"call_id": "expired-2", "recording_url": f"{store_url}/held"}))
    await wait_for_state(ingest.url, "expired-2", {"downloading"})
    status, _ = await post(ingest.url, json.dumps({"call_id": "expired-2",
                                                   "recording_url": recorder.url_for("es-billing-angry.wav")}))
    assert status == 202
    release.set()  # the download in flight, on the old link, is answered 403
    status = await wait_for(ingest.url, "expired-2", lambda s: "transcribing" in s["stages"])
    assert "failed" not in status["stages"]


async def test_a_new_link_for_a_call_already_downloaded_is_refused_with_the_reason(
        ingest: Ingest, recorder: Recorder) -> None:
    await post(ingest.url, json.dumps({"call_id": "kept-1", "recording_url": recorder.url_for("es-billing-angry.wav")}))
    await wait_for(ingest.url, "kept-1", lambda s: "transcribing" in s["stages"])
    status, problem = await post(ingest.url, json.dumps({"call_id": "kept-1",
                                                         "recording_url": recorder.url_for("en-internet-angry.wav")}))
    assert status == 409
    assert "its recording is downloaded" in problem["detail"] and problem["status_url"].endswith("/v1/calls/kept-1")
    assert (await ingest.store.get("kept-1")).recording_url == recorder.url_for("es-billing-angry.wav")


async def test_a_recording_not_uploaded_yet_is_waited_for_within_recording_not_ready_seconds(
        tmp_path: Path, audio_dir: Path) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    recorder = await Recorder(uploads).start()
    try:
        async with running_ingest(tmp_path, not_ready_seconds=60) as ingest:
            await post(ingest.url, json.dumps({"call_id": "late-1", "recording_url": recorder.url_for("late.wav")}))
            waiting = await wait_for(ingest.url, "late-1", lambda s: s["error"] is not None)
            assert waiting["status"] == "downloading" and "not there yet" in waiting["error"]["message"]
            shutil.copy(audio_dir / "es-billing-angry.wav", uploads / "late.wav")  # the upload lands
            status = await wait_for(ingest.url, "late-1", lambda s: "transcribing" in s["stages"])
    finally:
        await recorder.stop()
    assert "failed" not in status["stages"] and recorder.requests.count("late.wav") >= 2


async def test_a_recording_still_missing_after_recording_not_ready_seconds_fails_saying_so(
        tmp_path: Path, recorder: Recorder) -> None:
    async with running_ingest(tmp_path, not_ready_seconds=0.5) as ingest:
        await post(ingest.url, json.dumps({"call_id": "never-1", "recording_url": recorder.url_for("never.wav")}))
        status = await wait_for_state(ingest.url, "never-1", {"failed"})
    assert "HTTP 404" in status["error"]["message"] and "RECORDING_NOT_READY_SECONDS" in status["error"]["message"]
    assert recorder.requests.count("never.wav") >= 2


async def test_a_403_is_waited_out_too_within_recording_not_ready_seconds(
        tmp_path: Path, expiring_store: tuple[str, asyncio.Event]) -> None:
    """S3 answers 403, not 404, for an object not uploaded yet when the link's signer may not list the bucket."""
    store_url, _ = expiring_store
    async with running_ingest(tmp_path, not_ready_seconds=0.5) as ingest:
        await post(ingest.url, json.dumps({"call_id": "late-403", "recording_url": f"{store_url}/expired"}))
        status = await wait_for_state(ingest.url, "late-403", {"failed"})
    assert "HTTP 403" in status["error"]["message"] and "RECORDING_NOT_READY_SECONDS" in status["error"]["message"]
    assert status["attempts"] >= 2


async def test_unreachable_transcribe_is_retried_not_failed(ingest: Ingest, recorder: Recorder) -> None:
    await post(ingest.url, json.dumps({"call_id": "wait-1", "recording_url": recorder.url_for("es-billing-angry.wav")}))
    status = await wait_for_state(ingest.url, "wait-1", {"transcribing"})
    for _ in range(100):
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{ingest.url}/v1/calls/wait-1") as resp:
                status = await resp.json()
        if status["attempts"] >= 3:
            break
        await asyncio.sleep(0.1)
    assert status["status"] == "transcribing"  # waits for the service, beyond max_attempts=2
    assert status["attempts"] >= 3
    assert "UNAVAILABLE" in status["error"]["message"]


async def test_failed_calls_are_listed_and_can_be_retried(ingest: Ingest, recorder: Recorder) -> None:
    await post(ingest.url, json.dumps({"call_id": "retry-1", "recording_url": recorder.url_for("missing.wav")}))
    await wait_for_state(ingest.url, "retry-1", {"failed"})
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{ingest.url}/v1/calls", params={"status": "failed"}) as resp:
            listed = await resp.json()
        assert [c["call_id"] for c in listed["calls"]] == ["retry-1"]
        async with session.post(f"{ingest.url}/v1/calls/retry-1:retry") as resp:
            assert resp.status == 202
    status = await wait_for_state(ingest.url, "retry-1", {"failed"})
    assert list(status["stages"])[-2:] == ["downloading", "failed"]


async def failed_call(ingest: Ingest, call_id: str) -> None:
    await ingest.worker.stop(1)  # the call stays where a retry puts it
    status, _ = await post(ingest.url, json.dumps({"call_id": call_id, "recording_url": "http://127.0.0.1:9/a.wav"}))
    assert status == 202
    await ingest.store.update(call_id, None, state="failed", error="recorder answered 404", error_stage="downloading")


async def retry_with(url: str, call_id: str, headers: dict[str, str]) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/calls/{call_id}:retry", headers=headers) as resp:
            return resp.status


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
async def test_a_browser_request_from_another_site_cannot_retry_a_call(ingest: Ingest, site: str) -> None:
    await failed_call(ingest, "csrf-1")
    assert await retry_with(ingest.url, "csrf-1", {"Sec-Fetch-Site": site, "Origin": "http://localhost:1"}) == 403
    assert (await ingest.store.get("csrf-1")).state == "failed"


@pytest.mark.parametrize("origin", ["http://localhost:1", "null"])
async def test_a_request_from_another_origin_cannot_retry_a_call(ingest: Ingest, origin: str) -> None:
    await failed_call(ingest, "csrf-2")  # a browser that sends Origin but not Sec-Fetch-Site
    assert await retry_with(ingest.url, "csrf-2", {"Origin": origin}) == 403
    assert (await ingest.store.get("csrf-2")).state == "failed"


@pytest.mark.parametrize("headers", [{"Sec-Fetch-Site": "same-origin"}, {"Origin": "<own>"}, {}],
                         ids=["fetch-metadata", "origin", "no-browser"])
async def test_the_own_page_and_scripts_can_retry_a_call(ingest: Ingest, headers: dict[str, str]) -> None:
    await failed_call(ingest, "own-1")
    sent = {k: ingest.url if v == "<own>" else v for k, v in headers.items()}
    assert await retry_with(ingest.url, "own-1", sent) == 202
    assert (await ingest.store.get("own-1")).state == "downloading"


async def test_behind_a_proxy_the_public_url_is_the_origin_actions_must_come_from(ingest: Ingest) -> None:
    await failed_call(ingest, "proxied-1")
    runner, port = await start_site(create_app(ingest.store, ingest.worker, ingest.worker.downloader.policy, VERIFIER,
                                               public_url="https://calls.example.com/callmesh"), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}"
    try:  # a browser that sends Origin only: the page is on the proxy's https origin, not on ingest's address
        assert await retry_with(url, "proxied-1", {"Origin": url}) == 403
        assert await retry_with(url, "proxied-1", {"Origin": "https://calls.example.com"}) == 202
    finally:
        await runner.cleanup()


async def test_unknown_call_is_404(ingest: Ingest) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{ingest.url}/v1/calls/nope") as resp:
            assert resp.status == 404


async def test_status_api_needs_the_bearer_token_when_one_is_set(ingest: Ingest) -> None:
    runner, port = await start_site(create_app(ingest.store, ingest.worker, ingest.worker.downloader.policy,
                                               VERIFIER, api_token="s3cret"), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}"
    try:
        status, _ = await post(url, json.dumps({"call_id": "tok-1", "recording_url": "http://127.0.0.1:1/a.wav"}))
        assert status == 202  # the recorder's webhook is not behind the API token
        async with aiohttp.ClientSession() as session:
            for path in ("/v1/calls/tok-1", "/v1/calls"):
                async with session.get(url + path) as resp:
                    assert resp.status == 401
                async with session.get(url + path, headers={"Authorization": "Bearer wrong"}) as resp:
                    assert resp.status == 401
                async with session.get(url + path, headers={"Authorization": "Bearer s3cret"}) as resp:
                    assert resp.status == 200
            async with session.post(f"{url}/v1/calls/tok-1:retry") as resp:
                assert resp.status == 401
    finally:
        await runner.cleanup()


async def raw_request(url: str, path: str, body: bytes, *, sent: int | None = None) -> tuple[
        asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection to ingest and send a POST's head (signed as a webhook) and the first ``sent`` bytes of
    its body (all of it by default), as a client on a slow network would."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    head = {**signed_headers(SECRET, body), "Content-Type": "application/json", "Content-Length": str(len(body)),
            "Host": f"{host}:{port}"}
    writer.write(f"POST {path} HTTP/1.1\r\n".encode() + "".join(f"{k}: {v}\r\n" for k, v in head.items()).encode()
                 + b"\r\n" + body[:sent])
    await writer.drain()
    return reader, writer


async def answer_status(reader: asyncio.StreamReader, timeout: float = 10) -> int:
    status_line = await asyncio.wait_for(reader.readline(), timeout)
    return int(status_line.split()[1])


async def test_a_webhook_whose_body_arrives_in_pieces_is_read_whole(ingest: Ingest) -> None:
    body = json.dumps({"call_id": "in-pieces", "recording_url": "http://127.0.0.1:1/a.wav"}).encode()
    reader, writer = await raw_request(ingest.url, "/v1/calls", body, sent=10)
    try:
        await asyncio.sleep(0.2)  # the rest comes in a later segment
        writer.write(body[10:])
        await writer.drain()
        assert await answer_status(reader) == 202
    finally:
        writer.close()
    assert (await ingest.store.get("in-pieces")) is not None


@pytest.mark.parametrize("path, body", [
    ("/v1/calls", {"call_id": "stalled", "recording_url": "http://127.0.0.1:1/a.wav"}),
    ("/v1/calls/stalled:setAside", {"reason": "the CRM refuses it"}),
], ids=["webhook", "set-aside"])
async def test_a_request_whose_body_stops_coming_is_answered_408(tmp_path, path: str, body: dict) -> None:
    async with running_ingest(tmp_path, http_read_timeout=1.0) as ingest:
        reader, writer = await raw_request(ingest.url, path, json.dumps(body).encode(), sent=10)
        try:
            assert await answer_status(reader) == 408
            head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode().lower()
            assert "connection: close" in head
            length = int(head.split("content-length:")[1].split("\r\n")[0])
            assert b"INGEST_READ_TIMEOUT_SECONDS" in await asyncio.wait_for(reader.readexactly(length), 10)
        finally:
            writer.close()
        assert (await ingest.store.get("stalled")) is None


@pytest.mark.parametrize("sent", [b"", b"POST /v1/calls HTTP/1.1\r\nHost: 127.0.0.1\r\n"], ids=["nothing", "half a head"])
async def test_a_connection_that_sends_no_whole_request_is_closed_after_the_read_timeout(tmp_path, sent: bytes) -> None:
    async with running_ingest(tmp_path, http_read_timeout=1.0) as ingest:
        host, port = ingest.url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(sent)
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by ingest, not by this test's wait
        finally:
            writer.close()


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_each_write_to_the_job_store_is_timed_in_the_metrics(tmp_path: Path, request: pytest.FixtureRequest,
                                                             engine: str) -> None:
    """callmesh_store_write_duration_seconds: from a transaction's start to its commit on disk (or on the server),
    what every webhook waits for; a disk whose syncs stall shows there (alert CallmeshStoreWritesSlow)."""
    database = {"DATABASE_URL": request.getfixturevalue("pg_url")} if engine == "postgresql" else {}
    mesh = new_mesh({"INGEST_PORT": "0", "CALLMESH_DATA_DIR": str(tmp_path), "TRANSCRIBE_ADDR": UNUSED,
                     "ANALYZE_ADDR": UNUSED, "CRM_SYNC_ADDR": UNUSED, "RECORDING_ALLOWED_NETWORKS": "127.0.0.0/8",
                     **database}, tmp_path / "mesh")

    def writes() -> tuple[float, float]:
        with urllib.request.urlopen(f"{mesh.ingest_url}/metrics", timeout=10) as resp:
            scrape = resp.read().decode()
        return tuple(metric(scrape, f"callmesh_store_write_duration_seconds_{part}", store="ingest.jobs",
                            engine=engine) for part in ("count", "sum"))

    try:
        mesh.start_service("ingest", timeout=60)
        before, _ = writes()
        body = json.dumps({"call_id": f"timed-{engine}", "recording_url": "http://127.0.0.1:9/a.wav"}).encode()
        sent = urllib.request.Request(f"{mesh.ingest_url}/v1/calls", data=body, method="POST",
                                      headers={**signed_headers(mesh.webhook_secret, body),
                                               "Content-Type": "application/json"})
        with urllib.request.urlopen(sent, timeout=10) as resp:
            assert resp.status == 202
        count, seconds = writes()
    finally:
        mesh.stop()
    assert count >= before + 1 and seconds > 0  # the webhook's own write, at least


def test_ingest_serves_its_metrics_apart_from_the_api_when_told_where(tmp_path) -> None:
    """INGEST_METRICS_LISTEN: the counts stay off the port recorders reach."""
    mesh = new_mesh({"INGEST_PORT": "0", "INGEST_METRICS_LISTEN": "127.0.0.1:0", "CALLMESH_DATA_DIR": str(tmp_path),
                     "TRANSCRIBE_ADDR": UNUSED, "ANALYZE_ADDR": UNUSED, "CRM_SYNC_ADDR": UNUSED}, tmp_path / "mesh")
    try:
        mesh.start_service("ingest", timeout=60)
        metrics_url = mesh.services["ingest"].metrics_url
        assert not metrics_url.startswith(mesh.ingest_url)
        with urllib.request.urlopen(metrics_url, timeout=10) as resp:
            assert b"callmesh_calls{" in resp.read()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{mesh.ingest_url}/metrics", timeout=10)
        assert refused.value.code == 404
        with urllib.request.urlopen(f"{mesh.ingest_url}/openapi.json", timeout=10) as resp:
            paths = json.load(resp)["paths"]
        assert "/metrics" not in paths and "/v1/calls" in paths
    finally:
        mesh.stop()
