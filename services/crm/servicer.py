"""gRPC face of the outbox."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from callcenter.v1 import common_pb2, crm_pb2, crm_pb2_grpc
from services.common.database import UNAVAILABLE_ERRORS, outage_cause
from services.common.logs import call_context, printable_line
from services.common.protoconv import timestamp
from services.common.telemetry import current_traceparent
from services.crm.delivery import DeliveryWorker
from services.crm.outbox import (
    DELIVERED, FAILED, IN_FLIGHT, QUEUED, SET_ASIDE, DeliveryRow, Outbox, RevisionInFlight,
)
from services.crm.privacy import redact_record
from services.common.records import record_to_json

log = logging.getLogger(__name__)

_STATES = {QUEUED: crm_pb2.DELIVERY_STATE_QUEUED, DELIVERED: crm_pb2.DELIVERY_STATE_DELIVERED,
           FAILED: crm_pb2.DELIVERY_STATE_FAILED}


def to_delivery(row: DeliveryRow) -> crm_pb2.Delivery:
    d = crm_pb2.Delivery(call_id=row.call_id, state=_STATES[row.state], attempts=row.attempts,
                         last_error=row.last_error, idempotency_key=row.idempotency_key,
                         create_time=timestamp(row.created_at))
    if row.delivered_at is not None:
        d.deliver_time.CopyFrom(timestamp(row.delivered_at))
    if row.state == QUEUED and row.next_attempt_at is not None:
        d.next_attempt_time.CopyFrom(timestamp(row.next_attempt_at))
    return d


Response = TypeVar("Response")


def outbox_unavailable(rpc: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Response]]
                       ) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Response]]:
    """An RPC that the outbox cannot serve just then (a full disk, a database that is down) answers UNAVAILABLE
    with the cause, which ingest waits out without using up the call's attempts; not UNKNOWN, which it would
    retry a few times and then fail the call for. The cause is what :func:`outage_cause` allows."""

    @functools.wraps(rpc)
    async def guarded(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await rpc(self, request, context)
        except UNAVAILABLE_ERRORS as exc:
            log.error("the outbox could not serve %s: %s: %s", rpc.__name__, type(exc).__name__, exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"the outbox cannot serve this now ({outage_cause(exc)})")
            raise  # not reached: abort raises

    return guarded


class CrmSyncServicer(crm_pb2_grpc.CrmSyncServiceServicer):
    def __init__(self, outbox: Outbox, worker: DeliveryWorker, redact_pii: bool = True) -> None:
        self.outbox = outbox
        self.worker = worker
        self.redact_pii = redact_pii

    @outbox_unavailable
    async def Deliver(self, request: crm_pb2.DeliverRequest, context: grpc.aio.ServicerContext) -> crm_pb2.DeliverResponse:
        record = request.record
        if not record.call_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "record.call_id is required")
        with call_context(record.call_id):
            if self.redact_pii:  # before the outbox: personal data is never stored for the CRM, nor sent
                record = redact_record(record)
            try:
                row, new = await self.outbox.enqueue(record.call_id, record_to_json(record), current_traceparent(),
                                                     requeue_failed=request.requeue_failed)
            except RevisionInFlight as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc}: ask again once it is answered")
            if new:
                kinds = sorted({common_pb2.PiiKind.Name(r.kind) for r in record.redactions})
                again = (" (a retried call)" if request.requeue_failed
                         else f" (revision {record.revision}: the call analysed again)" if record.revision > 1 else "")
                log.info("queued for the CRM%s%s", again,
                         f" ({len(record.redactions)} redaction(s): {', '.join(kinds)})" if kinds else "")
                self.worker.wake()
            else:
                log.info("already in the outbox (%s): not queued again", row.state)
            return crm_pb2.DeliverResponse(delivery=to_delivery(row), record=record if new else None)

    @outbox_unavailable
    async def GetDelivery(self, request: crm_pb2.GetDeliveryRequest, context: grpc.aio.ServicerContext) -> crm_pb2.GetDeliveryResponse:
        row = await self.outbox.get(request.call_id)
        if row is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no delivery for call {request.call_id!r}")
        return crm_pb2.GetDeliveryResponse(delivery=to_delivery(row))

    @outbox_unavailable
    async def SetAsideDelivery(self, request: crm_pb2.SetAsideDeliveryRequest,
                               context: grpc.aio.ServicerContext) -> crm_pb2.SetAsideDeliveryResponse:
        if not request.call_id or not request.reason.strip() or not printable_line(request.reason):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "call_id and a reason on one line are required")
        with call_context(request.call_id):
            row, outcome = await self._outside_a_post(context, lambda: self.outbox.set_aside(
                request.call_id, request.reason.strip()))
            if row is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no delivery for call {request.call_id!r}")
            if outcome == IN_FLIGHT:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    "a POST of this record to the CRM did not end in time: ask again once it has")
            if outcome != SET_ASIDE:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"the delivery is {row.state}, not queued: only a queued record can be set aside")
            log.warning("set aside after %d attempt(s) (%s): the records behind it go on", row.attempts,
                        request.reason.strip())
            self.worker.wake()
            return crm_pb2.SetAsideDeliveryResponse(delivery=to_delivery(row))

    @outbox_unavailable
    async def DeleteDelivery(self, request: crm_pb2.DeleteDeliveryRequest,
                             context: grpc.aio.ServicerContext) -> crm_pb2.DeleteDeliveryResponse:
        if not request.call_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "call_id is required")
        with call_context(request.call_id):
            row, outcome = await self._outside_a_post(context, lambda: self.outbox.erase(request.call_id))
            if row is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no delivery for call {request.call_id!r}")
            if outcome == IN_FLIGHT:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    "a POST of this record to the CRM did not end in time: ask again once it has")
            log.warning("record erased from the outbox on request (it was %s)", row.state)
            if row.state == QUEUED:
                self.worker.wake()  # the records behind it go on
            return crm_pb2.DeleteDeliveryResponse(delivery=to_delivery(row))

    async def _outside_a_post(self, context: grpc.aio.ServicerContext,
                              change: Callable[[], Awaitable[tuple[DeliveryRow | None, str]]]
                              ) -> tuple[DeliveryRow | None, str]:
        """``change()`` the outbox once no POST of the record is in flight (the CRM may be taking it right now):
        this replica's POSTs say when they end, another replica's end within its lease. Gives up at the
        lease or the call's deadline, with ``IN_FLIGHT``."""
        remaining = context.time_remaining()
        deadline = time.monotonic() + min(self.worker.settings.lease_seconds,
                                          remaining - 0.5 if remaining is not None else float("inf"))
        while True:
            row, outcome = await change()
            if outcome != IN_FLIGHT or time.monotonic() >= deadline:
                return row, outcome
            await self.worker.wait_for_a_post(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
