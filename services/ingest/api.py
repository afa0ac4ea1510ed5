"""The HTTP face of ingest: the recorder's webhook and the status API.

``POST /v1/calls`` validates, writes the job durably and answers 202 with the
status URL; the work happens later in the pipeline worker. ``GET
/v1/calls/{call_id}`` says where each call is, with a time per stage, the
error and its stage when it failed, and the CRM record when done.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web
from yarl import URL

from opentelemetry.metrics import Observation

from services.common.database import UNAVAILABLE_ERRORS, outage_cause
from services.common.logs import call_context, printable_line
from services.common.metrics import add_metrics_route, meter, outcome_counter
from services.common.telemetry import current_traceparent, server_span_middleware, shown_url, trace_id_hex
from services.ingest.config import DownloadSettings
from services.ingest.openapi import openapi_document
from services.ingest.pipeline import PipelineWorker
from services.ingest.signatures import SignatureRejected, WebhookVerifier
from services.ingest.store import (
    ANALYZING, CALL_ID_RE, DELIVERING, DONE, FAILED, MAX_METADATA_ENTRIES, MAX_METADATA_VALUE, MAX_OFFSET,
    METADATA_KEY_RE, STATES, Job, JobOptions, JobStore, metadata_query, transcribed_seconds,
)
from services.ingest.urlpolicy import UrlPolicy, UrlRejected
from services.ingest.web import WebPages, authorized

log = logging.getLogger(__name__)
_meter = meter(__name__)
_webhooks = outcome_counter(__name__, "callmesh.webhooks", "Webhooks answered (outcome: accepted, duplicate, "
                            "relinked (a new recording link for a known call), or the HTTP status of a refusal)")

MAX_BODY_BYTES = 64 * 1024
STORE_RETRY_AFTER_SECONDS = 5  # the Retry-After of a request the job store could not serve
MAX_PAGE = 500
# An ISO 639 code, or a locale (BCP 47: es-MX, pt_BR, zh-Hant-TW) whose language is taken: Whisper has no regions.
LANGUAGE_RE = re.compile(r"([a-z]{2,3})(?:[-_][a-z0-9]{1,8})*")
STORE = web.AppKey("store", JobStore)
WORKER = web.AppKey("worker", PipelineWorker)
POLICY = web.AppKey("policy", UrlPolicy)
VERIFIER = web.AppKey("verifier", WebhookVerifier)
OUTCOME = web.RequestKey("callmesh.webhook_outcome", str)  # "duplicate" or "relinked" when the call was known
SETTINGS = web.AppKey("settings", dict)
METRICS_REFRESH = web.AppKey("metrics_refresh_hook", Callable[[], Awaitable[None]])  # before each scrape


def problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None,
            **extra: Any) -> web.Response:
    """An RFC 9457 problem document (counted as a refused webhook when it answers one)."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return web.json_response(body, status=status, content_type="application/problem+json", headers=headers)


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")


def status_url(base_url: str, call_id: str) -> str:
    return f"{base_url}/v1/calls/{call_id}"


def job_view(job: Job, base_url: str = "") -> dict[str, Any]:
    transcript = job.transcript or {}
    view: dict[str, Any] = {
        "call_id": job.call_id,
        "status": job.state,
        "status_url": status_url(base_url, job.call_id),
        "recording_url": shown_url(job.recording_url),  # a signed link's query is a key to the recording
        "options": job.options.given(),
        "created_at": _iso(job.created_at),
        "updated_at": _iso(job.updated_at),
        "stages": {state: _iso(ts) for state, ts in sorted(job.stage_times.items(), key=lambda kv: kv[1])},
        "attempts": job.attempts,
        "trace_id": job.trace_id,
        "error": None,
        "progress": {
            "language": transcript.get("language"),
            "segments": len(transcript.get("segments", [])),
            "audio_seconds": transcript.get("audio_duration"),
            "transcribed_seconds": transcribed_seconds(transcript),
            "transcript_complete": bool(transcript.get("complete")),
            "in_progress": job.in_progress(time.time()),
        },
    }
    if job.error:
        view["error"] = {"stage": job.error_stage, "message": job.error}
    if job.state == FAILED:
        view["recording_kept"] = job.recording_path is not None
    if job.state not in (DONE, FAILED) and job.error:
        view["next_attempt_at"] = _iso(job.next_attempt_at)
    if job.result and "delivery" in job.result:
        view["delivery"] = job.result["delivery"]
    if job.state == DONE and job.result:
        view["result"] = job.result.get("record")
    return view


def validate_webhook(payload: Any, policy: UrlPolicy) -> tuple[str, str, JobOptions]:
    """Return (call_id, recording_url, options) or raise ValueError with what is wrong."""
    if not isinstance(payload, dict):
        raise ValueError("the body must be a JSON object with call_id and recording_url")
    missing = [k for k in ("call_id", "recording_url") if k not in payload]
    if missing:
        raise ValueError(f"missing field(s): {', '.join(missing)}")
    call_id, url = payload["call_id"], payload["recording_url"]
    if not isinstance(call_id, str) or not CALL_ID_RE.fullmatch(call_id) or set(call_id) <= {"."}:
        raise ValueError("call_id must be 1 to 128 characters of A-Z a-z 0-9 . _ : @ - (and not only dots)")
    if not isinstance(url, str) or len(url) > 2048:
        raise ValueError("recording_url must be a string of at most 2048 characters")
    policy.check_url(url)
    language = payload.get("language")
    if language is not None:
        code = LANGUAGE_RE.fullmatch(language.lower()) if isinstance(language, str) else None
        if code is None:
            raise ValueError("language must be an ISO 639-1 code such as 'es', or a locale such as 'es-MX'")
        language = code[1]
    agent = payload.get("agent_channel")
    if agent is not None and agent not in ("left", "right"):
        raise ValueError("agent_channel must be 'left' or 'right' (stereo recordings), or absent for mono")
    metadata = payload.get("metadata")
    if metadata is not None and not _valid_metadata(metadata):
        raise ValueError(f"metadata must be an object of at most {MAX_METADATA_ENTRIES} string values of up to "
                         f"{MAX_METADATA_VALUE} characters (text: no NUL, no lone surrogate), named by 1 to 64 "
                         "characters of A-Z a-z 0-9 _ . -")
    return call_id, url, JobOptions(language=language or None, agent_channel=agent,
                                    metadata=metadata or None)


def _valid_metadata(metadata: Any) -> bool:
    return isinstance(metadata, dict) and len(metadata) <= MAX_METADATA_ENTRIES and all(
        METADATA_KEY_RE.fullmatch(key) and isinstance(value, str) and len(value) <= MAX_METADATA_VALUE
        and _is_text(value) for key, value in metadata.items())


def _is_text(value: str) -> bool:
    """Whether ``value`` is text every store and CRM takes: JSON may escape a NUL (which PostgreSQL's jsonb
    refuses) or half of a UTF-16 pair (which is no character at all)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return "\x00" not in value


def _base_url(request: web.Request) -> str:
    configured = request.app[SETTINGS].get("public_url")
    return configured or f"{request.scheme}://{request.host}"


Handler = Callable[[web.Request], Awaitable[web.Response]]


def requires_token(handler: Handler) -> Handler:
    """With API_TOKEN set, answer 401 unless the request carries ``Authorization: Bearer <token>``
    (or the web page's login cookie)."""

    @functools.wraps(handler)
    async def checked(request: web.Request) -> web.Response:
        if not authorized(request, request.app[SETTINGS].get("api_token", "")):
            return problem(401, "Unauthorized", "a valid bearer token is required",
                           headers={"WWW-Authenticate": 'Bearer realm="callmesh"'})
        return await handler(request)

    return checked


def store_unavailable(request: web.Request, exc: Exception) -> web.Response:
    """503 with ``Retry-After`` for a request the job store could not serve (a full disk, a database that is down):
    the recorder sends the webhook again later, so no call is lost to it. The cause goes to the log; the answer
    gives what :func:`outage_cause` allows."""
    log.error("the job store could not serve %s %s: %s: %s", request.method, request.path, type(exc).__name__, exc)
    cause = outage_cause(exc)
    then = "send the webhook again later (a call sent twice is one call)" if request.path == "/v1/calls" \
        else "send the request again later"
    return problem(503, "Service Unavailable", f"the job store cannot serve this request now ({cause}); {then}",
                   {"Retry-After": str(STORE_RETRY_AFTER_SECONDS)})


@web.middleware
async def store_trouble(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Any request the job store fails for a reason of its own answers :func:`store_unavailable`, not a bare 500."""
    try:
        return await handler(request)
    except UNAVAILABLE_ERRORS as exc:
        return store_unavailable(request, exc)


def site_options(read_timeout: float) -> dict[str, Any]:
    """aiohttp options for ingest's HTTP server. Its keep-alive timer also runs from the moment a connection
    opens: a client that sends nothing, or only part of a request's head, is cut off after ``read_timeout``
    (aiohttp's own default is an hour, so slow or silent clients could hold connections open for good)."""
    return {"keepalive_timeout": read_timeout}


async def post_call(request: web.Request) -> web.Response:
    try:
        response = await _post_call(request)
    except UNAVAILABLE_ERRORS as exc:
        response = store_unavailable(request, exc)
    _webhooks[request.get(OUTCOME, "accepted") if response.status == 202 else str(response.status)] += 1
    return response


async def _post_call(request: web.Request) -> web.Response:
    if request.content_type != "application/json":
        return problem(415, "Unsupported Media Type", "send the webhook as application/json")
    body = await request.read()  # whole, and in time: see body_in_time
    try:
        webhook_id = request.app[VERIFIER].verify(body, request.headers)
    except SignatureRejected as exc:
        log.warning("webhook refused: %s", exc)
        return problem(401, "Unauthorized", f"webhook signature refused: {exc}",
                       headers={"WWW-Authenticate": 'StandardWebhooks realm="callmesh"'})
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return problem(400, "Bad Request", f"the body is not valid JSON: {exc}")
    try:
        call_id, url, options = validate_webhook(payload, request.app[POLICY])
    except (ValueError, UrlRejected) as exc:
        return problem(422, "Unprocessable Content", str(exc))
    with call_context(call_id):
        job, new = await request.app[STORE].create(call_id, url, options, current_traceparent(), trace_id_hex(),
                                                    webhook_id)
        if not new and job.call_id != call_id:
            log.info("webhook-id %s seen before (call %s): acknowledged, not processed again", webhook_id, job.call_id)
        elif not new and job.recording_url != url:
            relinked = await request.app[STORE].relink(call_id, url, options, webhook_id)
            if relinked is None:
                return problem(409, "Conflict", f"call {call_id} was already received with another recording_url, "
                               f"and {_has_recording(job)}: a new link is taken only while the call has "
                               "no recording", status_url=status_url(_base_url(request), call_id))
            job = relinked
            request[OUTCOME] = "relinked"
            if job.state == FAILED:
                log.info("call received again with a new recording link, kept for its retry: it failed at %s and "
                         "its recording was let go (POST /v1/calls/%s:retry downloads it from the new link)",
                         job.error_stage, call_id)
            else:
                log.info("call received again with a new recording link, taken in place of the earlier one "
                         "(its recording was not downloaded yet)")
                request.app[WORKER].wake()
        elif new:
            log.info("call received")
            request.app[WORKER].wake()
        else:
            log.info("call received again: same job, not processed twice")
    if not new and OUTCOME not in request:
        request[OUTCOME] = "duplicate"
    url_of_status = status_url(_base_url(request), job.call_id)
    body = {"call_id": job.call_id, "status": job.state, "status_url": url_of_status, "trace_id": job.trace_id,
            "duplicate": not new}
    return web.json_response(body, status=202, headers={"Location": url_of_status})


def _has_recording(job: Job) -> str:
    if job.state == DONE:
        return "it is done"
    if job.state == FAILED:
        return f"it failed at {job.error_stage} with its recording kept (POST /v1/calls/{job.call_id}:retry replays it)"
    return "its recording is downloaded"


@requires_token
async def get_call(request: web.Request) -> web.Response:
    call_id = request.match_info["call_id"]
    job = await request.app[STORE].get(call_id)
    if job is None:
        return problem(404, "Not Found", f"no call {call_id!r}")
    return web.json_response(job_view(job, _base_url(request)))


@requires_token
async def delete_call(request: web.Request) -> web.Response:
    """Erase a finished call, for a caller who asks that their data be erased: its record in crm's outbox, its
    row here (transcript, analysis, record) and a failed call's recording. The CRM's copy is the CRM's to erase."""
    call_id = request.match_info["call_id"]
    job = await request.app[STORE].get(call_id)
    if job is None:
        return problem(404, "Not Found", f"no call {call_id!r}")
    if job.state not in (DONE, FAILED):
        return problem(409, "Conflict", f"call {call_id} is {job.state}: only a done or failed call can be erased "
                       "(a call waiting for the CRM can be set aside first)")
    with call_context(call_id):
        try:
            if job.state == DONE or job.error_stage == DELIVERING:  # a call failed before then has no record there
                await request.app[WORKER].erase_delivery(call_id)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                return problem(409, "Conflict", f"call {call_id} cannot be erased now: {exc.details()}")
            return problem(503, "Service Unavailable", f"the crm service did not answer: {exc.code().name}",
                           {"Retry-After": "5"})
        erased = await request.app[STORE].erase_finished(call_id)
        if erased is None:
            return problem(409, "Conflict", f"call {call_id} was retried meanwhile: erase it once it is done")
        if erased.recording_path:
            await asyncio.to_thread(Path(erased.recording_path).unlink, missing_ok=True)
        log.warning("call erased on request (it was %s), with its record in the outbox", erased.state)
    return web.Response(status=204)


@requires_token
async def post_call_action(request: web.Request) -> web.Response:
    name = request.match_info["call_id"]
    call_id, _, action = name.rpartition(":")
    handler = _ACTIONS.get(action)
    if not call_id or handler is None:
        return problem(404, "Not Found", "unknown action; POST /v1/calls/{call_id}:retry replays a failed call, "
                       "POST /v1/calls/{call_id}:setAside takes its record out of the CRM queue, "
                       "POST /v1/calls/{call_id}:reanalyze analyses a done call again")
    job = await request.app[STORE].get(call_id)
    if job is None:
        return problem(404, "Not Found", f"no call {call_id!r}")
    return await handler(request, job)


async def _retry(request: web.Request, job: Job) -> web.Response:
    store, call_id = request.app[STORE], job.call_id
    if job.state != FAILED:
        return problem(409, "Conflict", f"call {call_id} is {job.state}, only failed calls can be retried")
    await store.update(call_id, None, state=job.error_stage or "received", release=True, error=None,
                       next_attempt_at=0, **PipelineWorker.retry_fields(job))
    request.app[WORKER].wake()
    return await _accepted(request, call_id)


async def _reanalyze(request: web.Request, job: Job) -> web.Response:
    """Analyse a done call again (after a change of taxonomy, prompt or model) and send the CRM the new record, a
    revision of the one it has, under a key of its own. The transcript is kept; the recording is not needed."""
    store, call_id = request.app[STORE], job.call_id
    if job.state != DONE:
        hint = " (a failed one: :retry)" if job.state == FAILED else ""
        return problem(409, "Conflict", f"call {call_id} is {job.state}: only a done call can be analysed "
                       f"again{hint}")
    if job.transcript is None:
        return problem(409, "Conflict", f"call {call_id} has no transcript kept to analyse again")
    fields = PipelineWorker.reanalysis_fields(job)
    await store.update(call_id, None, state=ANALYZING, release=True, **fields)
    log.info("call analysed again on request: its next record is revision %d", fields["result"]["revision"])
    request.app[WORKER].wake()
    return await _accepted(request, call_id)


async def _set_aside(request: web.Request, job: Job) -> web.Response:
    """Take the call's record out of the CRM queue (it fails at delivery with the reason; ``:retry`` sends it
    again): for a record the CRM fails on while it takes others, which would hold up every call behind it."""
    if request.content_type != "application/json":  # a cross-site form cannot send it without a CORS preflight
        return problem(415, "Unsupported Media Type", 'send {"reason": "..."} as application/json')
    try:
        body = await request.json() if request.body_exists else {}
    except ValueError:  # not JSON, or not UTF-8
        return problem(400, "Bad Request", "the body is not JSON")
    reason = body.get("reason") if isinstance(body, dict) else None
    if (not isinstance(reason, str) or not reason.strip() or len(reason) > 500
            or not printable_line(reason)):
        return problem(422, "Unprocessable Content", 'the body must be {"reason": "..."}: why the record is set '
                       "aside, 1 to 500 characters on one line")
    if job.state != DELIVERING:
        return problem(409, "Conflict", f"call {job.call_id} is {job.state}: only a call waiting for the CRM "
                       "(delivering) can be set aside")
    try:
        await request.app[WORKER].set_aside_delivery(job.call_id, reason.strip())
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
            detail = "its record is not queued for the CRM yet" if exc.code() == grpc.StatusCode.NOT_FOUND \
                else exc.details()
            return problem(409, "Conflict", f"call {job.call_id} cannot be set aside now: {detail}")
        return problem(503, "Service Unavailable", f"the crm service did not answer: {exc.code().name}",
                       {"Retry-After": "5"})
    log.warning("call %s: its record is set aside from the CRM queue (%s)", job.call_id, reason.strip())
    return await _accepted(request, job.call_id)


async def _accepted(request: web.Request, call_id: str) -> web.Response:
    job = await request.app[STORE].get(call_id)
    assert job is not None
    return web.json_response(job_view(job, _base_url(request)), status=202)


_ACTIONS: dict[str, Callable[[web.Request, Job], Awaitable[web.Response]]] = {
    "retry": _retry, "setAside": _set_aside, "reanalyze": _reanalyze}


@requires_token
async def list_calls(request: web.Request) -> web.Response:
    status = request.query.get("status")
    if status is not None and status not in STATES:
        return problem(400, "Bad Request", f"status must be one of {', '.join(STATES)}")
    try:
        limit = int(request.query.get("limit", "100"))
        offset = int(request.query.get("offset", "0"))
    except ValueError:
        return problem(400, "Bad Request", "limit and offset must be integers")
    if not 1 <= limit <= MAX_PAGE or not 0 <= offset <= MAX_OFFSET:
        return problem(400, "Bad Request", f"limit must be 1 to {MAX_PAGE} and offset 0 to {MAX_OFFSET}")
    metadata = None
    if (wanted := request.query.get("metadata")) is not None and (metadata := metadata_query(wanted)) is None:
        return problem(400, "Bad Request", "metadata must be KEY=VALUE: a key of the webhook's metadata and the "
                       f"value it had (up to {MAX_METADATA_VALUE} characters)")
    jobs = await request.app[STORE].list(status, limit, offset, metadata)
    base = _base_url(request)
    return web.json_response({"calls": [job_view(j, base) for j in jobs], "counts": await request.app[STORE].counts()})


async def healthz(request: web.Request) -> web.Response:
    """Ready when the job store answers: a replica cut off from its database stops taking webhooks."""
    try:
        await asyncio.wait_for(request.app[STORE].ping(), timeout=2.0)
    except Exception as exc:  # any failure to reach the store means not ready
        log.warning("health check: job store unreachable: %s", exc)
        return web.json_response({"status": "unavailable", "detail": f"job store: {type(exc).__name__}"}, status=503)
    return web.json_response({"status": "ok"})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(metrics=request.app[SETTINGS]["metrics_on_api"]))


def _gauges(store: JobStore, downloads: DownloadSettings) -> Callable[[], Awaitable[None]]:
    """Calls per state and the age of the oldest call in the pipeline, read before each scrape; the free space
    where the recordings go, and the reserve downloads leave there (below it, calls wait at downloading)."""
    snapshot: dict[str, Any] = {"counts": {}, "oldest": None}

    def free(_: Any) -> list[Observation]:
        try:
            return [Observation(shutil.disk_usage(downloads.directory).free)]
        except OSError:  # the directory is gone for now: the next download makes it again
            return []

    _meter.create_observable_gauge("callmesh.recordings.free_bytes", callbacks=[free],
                                   description="Free bytes on the disk of RECORDING_DIR")
    _meter.create_observable_gauge(
        "callmesh.recordings.min_free_bytes", callbacks=[lambda _: [Observation(downloads.min_free_bytes)]],
        description="RECORDING_MIN_FREE_BYTES: below it, downloads wait for room")
    _meter.create_observable_gauge("callmesh.calls", description="Calls per state", callbacks=[
        lambda _: [Observation(snapshot["counts"].get(s, 0), {"state": s}) for s in STATES]])
    _meter.create_observable_gauge(
        "callmesh.queue.oldest_age", unit="s", description="How long the oldest call in the pipeline has been there",
        callbacks=[lambda _: [Observation(time.time() - snapshot["oldest"] if snapshot["oldest"] else 0.0)]])

    async def refresh() -> None:
        snapshot["counts"] = await store.counts()
        snapshot["oldest"] = await store.oldest_active_created_at()

    return refresh


UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def from_another_site(request: web.Request) -> bool:
    """Whether a browser sends this request from a page of another origin (a form or script on some web site
    an operator has open). Browsers say so in ``Sec-Fetch-Site`` (older ones only in ``Origin``); recorders,
    scripts and the CLI send neither and are not affected."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site not in ("same-origin", "none")  # "none": typed or bookmarked by the user, not sent by a page
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    public = request.app[SETTINGS].get("public_url")
    expected = str(URL(public).origin()) if public else f"{request.scheme}://{request.host}"
    return origin != expected  # "null" (a sandboxed or file page) is another site too


@web.middleware
async def same_origin_changes(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a request that would change something when a page of another site sends it. Without API_TOKEN a
    bare ``POST /v1/calls/{id}:retry`` from a form on any web site would replay a failed call through the
    operator's browser; with it, the SameSite=Strict login cookie keeps such requests out already."""
    if request.method in UNSAFE_METHODS and from_another_site(request):
        log.warning("refused %s %s sent by a page of another site (Origin %r, Sec-Fetch-Site %r)", request.method,
                    request.path, request.headers.get("Origin"), request.headers.get("Sec-Fetch-Site"))
        return problem(403, "Forbidden", "a page of another site cannot change calls here; send the request from "
                       "this service's own page, or without a browser")
    return await handler(request)


@web.middleware
async def body_in_time(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Read a request's body whole before its handler runs, within INGEST_READ_TIMEOUT_SECONDS (``408``
    otherwise) and up to 64 KiB (``413``): a client that sends part of a body and stops holds nothing open for
    long. Whole, because one ``content.read()`` gives only what has arrived so far, and a webhook split across
    TCP segments would be judged (its signature, its JSON) on its first part."""
    if not request.can_read_body:
        return await handler(request)
    read_timeout = request.app[SETTINGS]["read_timeout"]
    try:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise web.HTTPRequestEntityTooLarge(MAX_BODY_BYTES, request.content_length)  # not read at all
        if request.content.is_eof():  # all of it came with the head (a webhook, most often): no wait
            await request.read()  # kept by the request for the handler's read(), json() or post()
        else:
            async with asyncio.timeout(read_timeout):
                await request.read()
    except TimeoutError:
        log.warning("refused %s %s: its body did not arrive within %.0f s", request.method, request.path,
                    read_timeout)
        refusal = problem(408, "Request Timeout", f"the body did not arrive within {read_timeout:.0f} s "
                          "(INGEST_READ_TIMEOUT_SECONDS)", headers={"Connection": "close"})
    except web.HTTPRequestEntityTooLarge:
        refusal = problem(413, "Payload Too Large", f"the body is over {MAX_BODY_BYTES} bytes")
    else:
        return await handler(request)
    if request.match_info.handler is post_call:  # a refused webhook is counted as post_call counts them
        _webhooks[str(refusal.status)] += 1
    return refusal


def create_app(store: JobStore, worker: PipelineWorker, policy: UrlPolicy, verifier: WebhookVerifier, *,
               api_token: str = "", public_url: str = "", read_timeout: float = 30.0,
               metrics_on_api: bool = True) -> web.Application:
    """Ingest's HTTP API. ``metrics_on_api``: ``/metrics`` on this port too; otherwise serve it elsewhere with
    :data:`METRICS_REFRESH` (``INGEST_METRICS_LISTEN``)."""
    app = web.Application(client_max_size=MAX_BODY_BYTES,
                          middlewares=[server_span_middleware(), same_origin_changes, body_in_time, store_trouble])
    app[STORE] = store
    app[WORKER] = worker
    app[POLICY] = policy
    app[VERIFIER] = verifier
    app[SETTINGS] = {"api_token": api_token, "public_url": public_url, "read_timeout": read_timeout,
                     "metrics_on_api": metrics_on_api}
    app.router.add_post("/v1/calls", post_call)
    app.router.add_get("/v1/calls", list_calls)
    app.router.add_get("/v1/calls/{call_id}", get_call)
    app.router.add_post("/v1/calls/{call_id}", post_call_action)
    app.router.add_delete("/v1/calls/{call_id}", delete_call)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/openapi.json", openapi)
    WebPages(store, api_token).register(app)
    app[METRICS_REFRESH] = _gauges(store, worker.downloader.settings)
    if metrics_on_api:
        add_metrics_route(app, app[METRICS_REFRESH])
    return app
