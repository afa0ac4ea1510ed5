"""The delivery worker: POSTs queued records to the CRM until it accepts them.

2xx means delivered (409 too: the CRM already has that Idempotency-Key).
Connection errors, timeouts, 408, 425, 429 and 5xx are retried with exponential
backoff and jitter, capped, with no limit on attempts: a CRM that is down
for a day gets its records the day after. So are a 401 and a 403: the CRM refuses
our credentials (or their right to post records), not the record, and would refuse
every record alike. A 403 can also be about one record (an account the key may not
write to): the record behind it is then posted, and when the CRM takes that one, the
403 was the record's own, and it fails. Any other 4xx is a permanent refusal of that
record: the delivery is marked failed with the CRM's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import time
from urllib.parse import urlsplit

import aiohttp
from opentelemetry import trace

from services.common.database import UNAVAILABLE_ERRORS, OutageLog, delete_in_batches
from services.common.https import https_context, is_this_machine, untrusted_certificate
from services.common.logs import call_context
from services.common.metrics import outcome_counter
from services.common.retry import backoff_delay, sleep_or_wake
from services.common.telemetry import client_trace_config, context_from, shown_url, tracer
from services.common.webhooks import signature_headers
from services.crm.config import CrmSettings
from services.crm.outbox import DeliveryRow, Outbox

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

RETRYABLE_STATUS = {408, 425, 429}
RETENTION_CHECK_SECONDS = 3600.0  # how often delivered records past their retention are looked for
attempt_outcomes = outcome_counter(__name__, "callmesh.crm.delivery_attempts", "POSTs to the CRM (outcome: delivered, "
                                   "retry, unauthorized (a 401 or 403: the CRM refuses our credentials; the record "
                                   "waits), failed)")


class Posted(enum.Enum):
    """What became of a record's POST."""

    DELIVERED = "delivered"  # the CRM has it
    REFUSED = "refused"  # refused for good: the delivery failed
    WAITING = "waiting"  # to be tried again, and the records behind it wait


def _count(span: trace.Span, outcome: str) -> None:
    """One POST's outcome, on its span and in callmesh_crm_delivery_attempts_total."""
    span.set_attribute("crm.outcome", outcome)
    attempt_outcomes[outcome] += 1


def plaintext_warning(crm_url: str, token: str, headers: bool = False) -> str | None:
    """What to warn about when records (transcripts, personal data) and the token or ``headers`` (CRM_HEADERS, often
    an API key) would cross the network unencrypted: ``CRM_URL`` over plain http to a host that is not this machine."""
    parts = urlsplit(crm_url)
    if parts.scheme != "http":
        return None
    host = (parts.hostname or "").lower()
    if is_this_machine(host):
        return None
    credentials = " and ".join(name for name, set_ in (("CRM_TOKEN", token), ("CRM_HEADERS", headers)) if set_)
    sent = "every record (transcripts, personal data)" + (f" and {credentials} go" if credentials else " goes")
    return f"CRM_URL is plain http to {host}: {sent} over the network unencrypted; use https"


class DeliveryWorker:
    def __init__(self, outbox: Outbox, settings: CrmSettings) -> None:
        self.outbox = outbox
        self.settings = settings
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._expiry: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None
        self._posted = asyncio.Condition()  # notified each time a POST's outcome is stored
        self._signer = settings.signer

    def wake(self) -> None:
        self._wake.set()

    async def wait_for_a_post(self, timeout: float) -> None:
        """Return when one of this worker's POSTs has ended and its outcome is stored, or after ``timeout``."""
        async with self._posted:
            try:
                await asyncio.wait_for(self._posted.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    async def start(self) -> None:
        if not self.settings.crm_url:
            log.warning("CRM_URL is not set: records are kept in the outbox until it is")
        elif warning := plaintext_warning(self.settings.crm_url, self.settings.crm_token,
                                          bool(self.settings.crm_headers)):
            log.warning("%s", warning)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=https_context(self.settings.tls_ca)),
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout_seconds),
            trace_configs=[client_trace_config()],
        )
        self._task = asyncio.create_task(self._loop(), name="crm-delivery")
        if self.settings.delivered_retention > 0:
            self._expiry = asyncio.create_task(self._expire_delivered(), name="crm-retention")

    async def stop(self) -> None:
        """Stop claiming; let the POSTs in flight finish; unfinished ones stay queued."""
        self._stopping.set()
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._expiry is not None:
            await self._expiry
        if self._session is not None:
            await self._session.close()

    async def _loop(self) -> None:
        outage = OutageLog(log, "the outbox")
        while not self._stopping.is_set():
            try:
                rows = (await self.outbox.claim_due(self.settings.batch, self.settings.lease_seconds)
                        if self.settings.crm_url else [])
                outage.answered()
                if rows:
                    await self._deliver_in_order(rows)
                    continue
                due = await self.outbox.next_due_at()
                wait = 5.0 if due is None else max(0.05, min(5.0, due - time.time()))
            except UNAVAILABLE_ERRORS as exc:
                outage.failed(exc)
                wait = 1.0
            except Exception:  # keep delivering whatever one bad row does
                log.exception("delivery loop error")
                wait = 1.0
            await sleep_or_wake(self._wake, wait)

    async def _expire_delivered(self) -> None:
        """At start and then every hour (or every retention, when shorter), delete the records the CRM took
        longer ago than ``CALL_RETENTION_DAYS``."""
        retention = self.settings.delivered_retention
        while not self._stopping.is_set():
            try:
                cutoff = time.time() - retention
                deleted = await delete_in_batches(lambda batch: self.outbox.delete_delivered(cutoff, batch))
                if deleted:
                    log.info("deleted %d record(s) delivered more than %.1f days ago (CALL_RETENTION_DAYS)",
                             deleted, retention / 86400)
            except Exception:
                log.exception("deleting delivered records past their retention failed; trying again later")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), min(RETENTION_CHECK_SECONDS, retention))

    async def _deliver_in_order(self, rows: list[DeliveryRow]) -> None:
        """Post oldest first; at the first transient failure the rest go back to wait behind it."""
        i = 0
        while i < len(rows):
            if self._stopping.is_set():
                await self.outbox.release([r.call_id for r in rows[i:]])
                return
            if i:  # the lease covers one POST: extend it for the rest
                await self.outbox.extend_lease([r.call_id for r in rows[i:]], self.settings.lease_seconds)
            posted, probed = await self._deliver(rows[i], rows[i + 1] if i + 1 < len(rows) else None)
            i += 2 if probed else 1
            if posted is Posted.WAITING:
                await self.outbox.release([r.call_id for r in rows[i:]])
                return

    async def _deliver(self, row: DeliveryRow, behind: DeliveryRow | None = None) -> tuple[Posted, bool]:
        """One POST, and whether the record ``behind`` it was posted too (see :meth:`_post`)."""
        try:
            return await self._post(row, behind)
        finally:
            async with self._posted:
                self._posted.notify_all()

    async def _post(self, row: DeliveryRow, behind: DeliveryRow | None) -> tuple[Posted, bool]:
        """POST ``row``. On a 403, the record ``behind`` it (when there is one) is posted too, to tell a refusal of
        this record (the CRM takes the next one: this one fails) from one of our credentials (it refuses the next
        one as well: both wait). Returns what became of ``row``, and whether ``behind`` was posted."""
        assert self._session is not None
        data = json.dumps(row.payload).encode()
        headers = {**dict(self.settings.crm_headers), "Idempotency-Key": row.idempotency_key,
                   "Content-Type": "application/json"}
        if self.settings.crm_token:
            headers["Authorization"] = f"Bearer {self.settings.crm_token}"
        if self._signer is not None:  # the record's key is the message id; each attempt is signed when it is sent
            headers.update(signature_headers(self._signer, row.idempotency_key, data, time.time()))
        with call_context(row.call_id), _tracer.start_as_current_span(
            "crm.post", context=context_from(row.trace_context), kind=trace.SpanKind.INTERNAL,
            attributes={"callmesh.call_id": row.call_id, "crm.attempt": row.attempts + 1},
        ) as span:
            try:
                # Never followed: a client that follows a 301 or 302 sends a GET in the POST's place, and the
                # page it lands on answering 200 would count as the CRM taking a record it never got (and the
                # token would go wherever the redirect points).
                async with self._session.post(self.settings.crm_url, data=data, headers=headers,
                                              allow_redirects=False) as resp:
                    body = (await resp.text())[:300]
                    status = resp.status
                    location = resp.headers.get("Location", "")
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                return await self._retry(row, span, untrusted_certificate(exc, "the CRM")
                                         or f"CRM unreachable: {type(exc).__name__}: {exc}".strip()), False
            span.set_attribute("http.response.status_code", status)
            if 200 <= status < 300 or status == 409:
                await self.outbox.mark_delivered(row.call_id)
                _count(span, "delivered")
                log.info("delivered to the CRM (HTTP %d) after %d attempt(s)", status, row.attempts + 1)
            elif 300 <= status < 400:  # CRM_URL is out of date: the record waits, as for a CRM that is down
                where = shown_url(location) if location else "nowhere"
                return await self._retry(row, span, f"CRM answered HTTP {status}, a redirect to {where}: the record "
                                         "was not delivered; set CRM_URL to the address the CRM takes records at"), False
            elif status in (401, 403):  # who we are, not the record: every record would be refused alike
                probed = False
                if status == 403 and behind is not None:  # unless the CRM takes the next record with the same key
                    probed = True  # the lease covers one POST: both are held for the next one
                    await self.outbox.extend_lease([row.call_id, behind.call_id], self.settings.lease_seconds)
                    if (await self._deliver(behind))[0] is Posted.DELIVERED:
                        return await self._refused(row, span, status, f"CRM refused the record: HTTP 403: {body} (it "
                                                   f"took the next record, {behind.call_id}, with the same "
                                                   "credentials)"), True
                refused, wanted = (("Callmesh's credentials", "match what the CRM expects") if status == 401 else
                                   ("Callmesh's credentials the right to post records", "name a credential the CRM "
                                    "allows to post records"))
                return await self._retry(row, span, f"CRM answered HTTP {status}, refusing {refused}: {body}; the "
                                         f"records wait until CRM_TOKEN, CRM_HEADERS or CRM_SIGNING_SECRET {wanted}",
                                         outcome="unauthorized"), probed
            elif status >= 500 or status in RETRYABLE_STATUS:
                return await self._retry(row, span, f"CRM answered HTTP {status}: {body}"), False
            else:
                return await self._refused(row, span, status, f"CRM refused the record: HTTP {status}: {body}"), False
            return Posted.DELIVERED, False

    async def _refused(self, row: DeliveryRow, span: trace.Span, status: int, error: str) -> Posted:
        """The CRM refused the record for good (HTTP ``status``): its delivery fails, saying why."""
        await self.outbox.mark_failed(row.call_id, error)
        _count(span, "failed")
        log.error("the CRM refused the record permanently: HTTP %d", status)
        return Posted.REFUSED

    async def _retry(self, row: DeliveryRow, span: trace.Span, error: str, outcome: str = "retry") -> Posted:
        """Keep the record queued for its next attempt, saying why."""
        delay = backoff_delay(row.attempts, self.settings.backoff_initial, self.settings.backoff_max)
        await self.outbox.mark_retry(row.call_id, error, time.time() + delay)
        log.warning("delivery attempt %d failed (%s); next try in %.1f s", row.attempts + 1, error, delay)
        _count(span, outcome)
        return Posted.WAITING
