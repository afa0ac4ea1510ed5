"""CRM sync on a real gRPC server with its outbox, delivering to a stand-in CRM on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import grpc
import pytest
from aiohttp import web
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from callcenter.v1 import common_pb2, crm_pb2
from callmesh.standins import CrmReceiver, new_webhook_secret
from services.common.config import ConfigError
from services.common.lifecycle import start_site
from services.common.retry import backoff_delay
from services.crm.config import CrmSettings, crm_headers
from services.crm.delivery import attempt_outcomes, plaintext_warning
from services.crm.outbox import FAILED as FAILED_ROW, IN_FLIGHT, QUEUED, SET_ASIDE, Outbox
from services.ingest.pipeline import PipelineWorker, delivery_poll_delay
from services.ingest.store import DELIVERING, FAILED
from tests.cli_mesh import CALLMESH, ROOT
from tests.crm_harness import (
    Crm, analysed_call, call_held_up_at_the_crm, crm_posting, crm_service, record, start_crm, wait_delivery,
    wait_state)
from tests.ingest_harness import running_ingest, stored_call, wait_for_state
from tests.tls import company_ca


async def test_record_reaches_the_crm_in_the_seed_shape(tmp_path: Path, receiver: CrmReceiver) -> None:
    async with crm_service(tmp_path / "o.db", receiver) as crm:
        queued = await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("c1")))
        assert queued.delivery.state in (crm_pb2.DELIVERY_STATE_QUEUED, crm_pb2.DELIVERY_STATE_DELIVERED)
        await wait_state(crm.stub, "c1", crm_pb2.DELIVERY_STATE_DELIVERED)
        body = receiver.for_call("c1")[0].body
        assert body["sentiment"] == "negative" and body["summary"] == ["a", "b", "c"]
        assert body["timestamp"] == "2026-09-21T14:13:20Z"
        assert receiver.records[0].idempotency_key == queued.delivery.idempotency_key


async def test_the_crm_gets_crm_token_as_a_bearer_token(tmp_path: Path, receiver: CrmReceiver) -> None:
    receiver.required_headers = {"Authorization": "Bearer crm-secret-1"}
    async with crm_service(tmp_path / "o.db", receiver, crm_token="crm-secret-1") as crm:
        await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("token-1")))
        await wait_state(crm.stub, "token-1", crm_pb2.DELIVERY_STATE_DELIVERED)


async def test_the_crm_gets_the_headers_of_crm_headers_with_every_record(
        tmp_path: Path, receiver: CrmReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRM_HEADERS", "X-Api-Key=key-5678, X-Tenant=north,Authorization=Basic YWdlbnQ6cHc=")
    receiver.required_headers = {"X-Api-Key": "key-5678", "X-Tenant": "north", "Authorization": "Basic YWdlbnQ6cHc="}
    async with crm_service(tmp_path / "o.db", receiver, crm_headers=crm_headers()) as crm:
        await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("headers-1")))
        await wait_state(crm.stub, "headers-1", crm_pb2.DELIVERY_STATE_DELIVERED)
        assert receiver.records[0].idempotency_key  # the delivery's own header is still its own


async def test_records_the_crm_refuses_our_credentials_for_wait_until_it_takes_them(
        tmp_path: Path, receiver: CrmReceiver) -> None:
    receiver.required_headers = {"X-Api-Key": "the-new-key"}  # the CRM's key was rotated before ours
    unauthorized = attempt_outcomes["unauthorized"]
    async with crm_service(tmp_path / "o.db", receiver, crm_headers=(("X-Api-Key", "the-old-key"),)) as crm:
        await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("stale-key")))
        waiting = await wait_delivery(crm.stub, "stale-key", lambda d: d.attempts >= 3, timeout=10)
        assert waiting.state == crm_pb2.DELIVERY_STATE_QUEUED
        assert "HTTP 401" in waiting.last_error and "CRM_HEADERS" in waiting.last_error
        assert attempt_outcomes["unauthorized"] - unauthorized >= 3  # what CallmeshCrmCredentialsRefused counts
        receiver.required_headers = {"X-Api-Key": "the-old-key"}  # the CRM takes the key again
        await wait_state(crm.stub, "stale-key", crm_pb2.DELIVERY_STATE_DELIVERED)
    assert len(receiver.for_call("stale-key")) == 1


async def test_the_crm_can_check_each_record_came_from_callmesh_by_its_signature(
        tmp_path: Path, receiver: CrmReceiver) -> None:
    secret = new_webhook_secret()
    receiver.signing_secret = secret  # the receiver checks it with the standardwebhooks package, as a CRM would
    async with crm_service(tmp_path / "o.db", receiver, signing_secret=secret) as crm:
        queued = await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("signed-1")))
        await wait_state(crm.stub, "signed-1", crm_pb2.DELIVERY_STATE_DELIVERED)
    assert receiver.for_call("signed-1")[0].idempotency_key == queued.delivery.idempotency_key


async def test_records_a_crm_forbids_our_credentials_to_post_wait_until_it_allows_them(
        tmp_path: Path, receiver: CrmReceiver) -> None:
    receiver.fail_with = 403  # the key is known, but its scope no longer lets it write records
    async with crm_service(tmp_path / "o.db", receiver) as crm:
        await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("scoped-1")))
        await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("scoped-2")))
        waiting = await wait_delivery(crm.stub, "scoped-1", lambda d: d.attempts >= 3, timeout=10)
        assert waiting.state == crm_pb2.DELIVERY_STATE_QUEUED
        assert "HTTP 403" in waiting.last_error and "allows to post records" in waiting.last_error
        behind = await crm.stub.GetDelivery(crm_pb2.GetDeliveryRequest(call_id="scoped-2"))
        assert behind.delivery.state == crm_pb2.DELIVERY_STATE_QUEUED  # in order, behind it: not failed either
        receiver.fail_with = None  # the scope is granted
        await wait_state(crm.stub, "scoped-2", crm_pb2.DELIVERY_STATE_DELIVERED)
    assert [r.body["call_id"] for r in receiver.records] == ["scoped-1", "scoped-2"]


async def test_a_403_about_one_record_fails_it_once_the_crm_takes_the_record_behind_it(
        tmp_path: Path, receiver: CrmReceiver) -> None:
    receiver.fail_for["locked-1"] = 403  # an account the key may not write to; the others it may
    async with crm_service(tmp_path / "o.db", receiver) as crm:
        await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("locked-1")))
        alone = await wait_delivery(crm.stub, "locked-1", lambda d: d.attempts >= 2, timeout=10)
        assert alone.state == crm_pb2.DELIVERY_STATE_QUEUED  # nothing behind it tells whose 403 it is yet
        for call_id in ("open-2", "open-3"):
            await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record(call_id)))
        failed = await wait_state(crm.stub, "locked-1", crm_pb2.DELIVERY_STATE_FAILED)
        await wait_state(crm.stub, "open-3", crm_pb2.DELIVERY_STATE_DELIVERED)
    assert "HTTP 403" in failed.last_error and "it took the next record, open-2" in failed.last_error
    assert [r.body["call_id"] for r in receiver.records] == ["open-2", "open-3"]


async def test_records_refused_403_alike_all_wait_and_none_fails(tmp_path: Path, receiver: CrmReceiver) -> None:
    receiver.fail_with = 403
    async with crm_service(tmp_path / "o.db", receiver) as crm:
        for call_id in ("scoped-3", "scoped-4", "scoped-5"):
            await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record(call_id)))
        head = await wait_delivery(crm.stub, "scoped-3", lambda d: d.attempts >= 3, timeout=10)
        probed = await crm.stub.GetDelivery(crm_pb2.GetDeliveryRequest(call_id="scoped-4"))
        last = await crm.stub.GetDelivery(crm_pb2.GetDeliveryRequest(call_id="scoped-5"))
    assert head.state == probed.delivery.state == last.delivery.state == crm_pb2.DELIVERY_STATE_QUEUED
    assert "HTTP 403" in probed.delivery.last_error and probed.delivery.attempts >= 1
    assert last.delivery.attempts == 0  # it waits behind the two, never posted


async def test_a_record_signed_with_another_secret_is_refused_by_the_crm_and_waits(
        tmp_path: Path, receiver: CrmReceiver) -> None:
    receiver.signing_secret = new_webhook_secret()
    async with crm_service(tmp_path / "o.db", receiver, signing_secret=new_webhook_secret()) as crm:
        await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("signed-2")))
        waiting = await wait_delivery(crm.stub, "signed-2", lambda d: d.attempts >= 2, timeout=10)
    assert waiting.state == crm_pb2.DELIVERY_STATE_QUEUED
    assert "HTTP 401" in waiting.last_error and "signature" in waiting.last_error and receiver.records == []


@pytest.mark.parametrize("secret", ["hunter2", "whsec_not base64!"])
def test_a_crm_signing_secret_that_is_not_whsec_base64_is_refused_at_start(
        monkeypatch: pytest.MonkeyPatch, secret: str) -> None:
    monkeypatch.setenv("CRM_SIGNING_SECRET", secret)
    with pytest.raises(ConfigError, match="CRM_SIGNING_SECRET"):
        CrmSettings.from_env()


@pytest.mark.parametrize(("value", "reason"), [
    ("X-Api-Key", "is not Name=value"), ("Bad Name=1", "is not Name=value"),
    ("Idempotency-Key=mine", "set by the delivery itself"), ("content-type=text/plain", "set by the delivery itself"),
    ("X-Api-Key=a\tb", "control character"), ("webhook-signature=v1,forged", "set by the delivery itself"),
    ('{"X-Api-Key": "a", ', "not a JSON object"), ('{"X-Api-Key": 5}', "not a JSON object"),
    ('{"Idempotency-Key": "mine"}', "set by the delivery itself"),
])
def test_crm_headers_that_would_break_the_post_are_refused_at_start(
        monkeypatch: pytest.MonkeyPatch, value: str, reason: str) -> None:
    monkeypatch.setenv("CRM_HEADERS", value)
    with pytest.raises(ConfigError, match=reason):
        crm_headers()


def test_crm_headers_as_a_json_object_carry_values_with_commas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRM_HEADERS", '{"X-Api-Key": "key-1", "X-Scopes": "calls.write, calls.read"}')
    assert crm_headers() == (("X-Api-Key", "key-1"), ("X-Scopes", "calls.write, calls.read"))


def test_crm_token_and_an_authorization_header_in_crm_headers_are_not_both_taken(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRM_TOKEN", "t")
    monkeypatch.setenv("CRM_HEADERS", "authorization=Basic eDp5")
    with pytest.raises(ConfigError, match="keep one"):
        CrmSettings.from_env()


async def test_deliver_is_idempotent_on_call_id(tmp_path: Path, receiver: CrmReceiver) -> None:
    async with crm_service(tmp_path / "o.db", receiver) as crm:
        replies = await asyncio.gather(*(crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("same"))) for _ in range(3)))
        assert len({r.delivery.idempotency_key for r in replies}) == 1
        await wait_state(crm.stub, "same", crm_pb2.DELIVERY_STATE_DELIVERED)
        await asyncio.sleep(0.3)
        assert receiver.posts == 1


async def test_crm_outage_is_retried_until_delivered(tmp_path: Path, receiver: CrmReceiver) -> None:
    receiver.fail_with = 503
    async with crm_service(tmp_path / "o.db", receiver) as crm:
        await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("outage")))
        d = await wait_delivery(crm.stub, "outage", lambda d: d.attempts >= 3, timeout=10)
        assert d.state == crm_pb2.DELIVERY_STATE_QUEUED and "503" in d.last_error
        receiver.fail_with = None
        delivered = await wait_state(crm.stub, "outage", crm_pb2.DELIVERY_STATE_DELIVERED)
        assert delivered.attempts >= 4 and delivered.last_error == ""
        assert len(receiver.for_call("outage")) == 1


async def test_an_https_crm_whose_certificate_the_companys_ca_issued_gets_the_record_through_outbound_tls_ca(
        tmp_path: Path) -> None:
    ca = company_ca(tmp_path / "ca")
    receiver = await CrmReceiver().start(ssl_context=ca.server)
    try:
        async with crm_service(tmp_path / "o.db", receiver, tls_ca=str(ca.authority.cert)) as crm:
            await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("tls-1")))
            await wait_state(crm.stub, "tls-1", crm_pb2.DELIVERY_STATE_DELIVERED)
    finally:
        await receiver.stop()
    assert receiver.url.startswith("https://") and len(receiver.for_call("tls-1")) == 1


async def test_a_crm_certificate_nobody_trusts_keeps_the_record_queued_naming_outbound_tls_ca(tmp_path: Path) -> None:
    receiver = await CrmReceiver().start(ssl_context=company_ca(tmp_path / "ca").server)
    try:
        async with crm_service(tmp_path / "o.db", receiver) as crm:
            await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("tls-2")))
            waiting = await wait_delivery(crm.stub, "tls-2", lambda d: d.attempts >= 2, timeout=10)
    finally:
        await receiver.stop()
    assert waiting.state == crm_pb2.DELIVERY_STATE_QUEUED and receiver.records == []
    assert "the CRM's TLS certificate is not trusted" in waiting.last_error and "OUTBOUND_TLS_CA" in waiting.last_error


async def test_crm_outage_then_recovery_delivers_every_record_once_in_order_of_arrival(
        tmp_path: Path, receiver: CrmReceiver) -> None:
    port = int(receiver.url.split(":")[2].split("/")[0])
    await receiver.stop()  # first the CRM refuses connections:
    # its port stays bound and not listening, so connections to it are refused, and no server started
    # meanwhile (the crm service's own, on port 0) can be given it before the CRM comes back there.
    down = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    down.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    down.bind(("127.0.0.1", port))
    crm = await start_crm(tmp_path / "o.db", receiver)
    try:
        batch = [f"batch-{i:02d}" for i in range(12)]
        for call_id in batch:
            await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record(call_id)))
        head = await wait_delivery(crm.stub, batch[0], lambda d: d.attempts >= 2, timeout=10)
        assert "unreachable" in head.last_error
        receiver.fail_with = 503  # then it is up but answers 503
        down.close()
        await receiver.start(port=port)
        head = await wait_delivery(crm.stub, batch[0], lambda d: "503" in d.last_error, timeout=10)
        assert receiver.records == []
        receiver.fail_with = None  # then it recovers
        for call_id in batch:
            await wait_state(crm.stub, call_id, crm_pb2.DELIVERY_STATE_DELIVERED)
        assert [r.body["call_id"] for r in receiver.records] == batch
        assert len({r.idempotency_key for r in receiver.records}) == len(batch)
        assert receiver.posts > len(batch)  # the 503s were posts too
    finally:
        down.close()
        await crm.close()


async def test_queued_record_survives_a_restart(tmp_path: Path, receiver: CrmReceiver) -> None:
    receiver.fail_with = 503
    crm = await start_crm(tmp_path / "o.db", receiver)
    await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("durable")))
    await crm.close()
    receiver.fail_with = None
    async with crm_service(tmp_path / "o.db", receiver) as crm:
        await wait_state(crm.stub, "durable", crm_pb2.DELIVERY_STATE_DELIVERED)
        assert len(receiver.for_call("durable")) == 1


async def test_permanent_refusal_marks_the_delivery_failed(tmp_path: Path, receiver: CrmReceiver) -> None:
    receiver.fail_with = 422
    async with crm_service(tmp_path / "o.db", receiver) as crm:
        await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("refused")))
        failed = await wait_state(crm.stub, "refused", crm_pb2.DELIVERY_STATE_FAILED)
        assert "HTTP 422" in failed.last_error


@contextlib.asynccontextmanager
async def crm_that_refused(tmp_path: Path, receiver: CrmReceiver) -> AsyncIterator[tuple[Crm, crm_pb2.Delivery]]:
    """A crm service whose CRM refused the record of call "refused" (HTTP 422), and takes records again now."""
    receiver.fail_with = 422
    async with crm_service(tmp_path / "o.db", receiver) as crm:
        first = await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("refused")))
        await wait_state(crm.stub, "refused", crm_pb2.DELIVERY_STATE_FAILED)
        receiver.fail_with = None
        yield crm, first.delivery


async def test_a_refused_record_is_not_sent_again_unless_asked(tmp_path: Path, receiver: CrmReceiver) -> None:
    async with crm_that_refused(tmp_path, receiver) as (crm, _):
        again = await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("refused")))
        assert again.delivery.state == crm_pb2.DELIVERY_STATE_FAILED and not again.HasField("record")
        await asyncio.sleep(0.3)
        assert receiver.posts == 1


async def test_a_refused_record_queued_again_is_delivered_under_the_same_key(
        tmp_path: Path, receiver: CrmReceiver) -> None:
    async with crm_that_refused(tmp_path, receiver) as (crm, first):
        fixed = record("refused")
        fixed.topic = "Refunds"
        again = await crm.stub.Deliver(crm_pb2.DeliverRequest(record=fixed, requeue_failed=True))
        assert again.delivery.state == crm_pb2.DELIVERY_STATE_QUEUED and again.record.topic == "Refunds"
        assert again.delivery.attempts == 0 and again.delivery.last_error == ""
        delivered = await wait_state(crm.stub, "refused", crm_pb2.DELIVERY_STATE_DELIVERED)
        assert delivered.idempotency_key == first.idempotency_key and delivered.attempts == 1
        assert [r.body["topic"] for r in receiver.for_call("refused")] == ["Refunds"]


async def test_a_record_queued_again_waits_behind_the_records_already_queued(
        tmp_path: Path, receiver: CrmReceiver) -> None:
    async with crm_that_refused(tmp_path, receiver) as (crm, _):
        receiver.fail_with = 503  # down: what is queued stays queued, in order
        await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("waiting")))
        await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("refused"), requeue_failed=True))
        receiver.fail_with = None
        await wait_state(crm.stub, "refused", crm_pb2.DELIVERY_STATE_DELIVERED)
        assert [r.body["call_id"] for r in receiver.records] == ["waiting", "refused"]


async def test_requeue_leaves_a_delivered_record_alone(tmp_path: Path, receiver: CrmReceiver) -> None:
    async with crm_service(tmp_path / "o.db", receiver) as crm:
        await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("taken")))
        await wait_state(crm.stub, "taken", crm_pb2.DELIVERY_STATE_DELIVERED)
        again = await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("taken"), requeue_failed=True))
        assert again.delivery.state == crm_pb2.DELIVERY_STATE_DELIVERED and not again.HasField("record")
        await asyncio.sleep(0.3)
        assert receiver.posts == 1


async def test_a_record_set_aside_lets_the_records_behind_it_reach_the_crm(
        tmp_path: Path, receiver: CrmReceiver) -> None:
    receiver.fail_for = {"stuck": 500}  # the CRM fails on this record only, and takes the others
    async with crm_service(tmp_path / "o.db", receiver) as crm:
        await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("stuck")))
        await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("behind-1")))
        await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("behind-2")))
        await wait_delivery(crm.stub, "stuck", lambda d: d.attempts >= 3, timeout=10)
        assert receiver.records == []  # strictly in order: nothing overtakes the head of the queue
        aside = await crm.stub.SetAsideDelivery(crm_pb2.SetAsideDeliveryRequest(call_id="stuck", reason="ticket 42"))
        assert aside.delivery.state == crm_pb2.DELIVERY_STATE_FAILED
        assert aside.delivery.last_error == "set aside: ticket 42" and aside.delivery.attempts >= 3
        await wait_state(crm.stub, "behind-2", crm_pb2.DELIVERY_STATE_DELIVERED)
        assert [r.body["call_id"] for r in receiver.records] == ["behind-1", "behind-2"]


async def test_a_record_set_aside_is_delivered_when_queued_again(tmp_path: Path, receiver: CrmReceiver) -> None:
    receiver.fail_for = {"stuck": 503}
    async with crm_service(tmp_path / "o.db", receiver) as crm:
        first = await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("stuck")))
        await wait_delivery(crm.stub, "stuck", lambda d: d.attempts >= 1, timeout=10)
        await crm.stub.SetAsideDelivery(crm_pb2.SetAsideDeliveryRequest(call_id="stuck", reason="CRM bug"))
        receiver.fail_for = {}  # the CRM is fixed
        await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("stuck"), requeue_failed=True))
        delivered = await wait_state(crm.stub, "stuck", crm_pb2.DELIVERY_STATE_DELIVERED)
        assert delivered.idempotency_key == first.delivery.idempotency_key
        assert [r.idempotency_key for r in receiver.for_call("stuck")] == [first.delivery.idempotency_key]


async def test_only_a_queued_record_can_be_set_aside(tmp_path: Path, receiver: CrmReceiver) -> None:
    async with crm_service(tmp_path / "o.db", receiver) as crm:
        await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("taken")))
        await wait_state(crm.stub, "taken", crm_pb2.DELIVERY_STATE_DELIVERED)
        for call_id, reason, code in [("taken", "late", grpc.StatusCode.FAILED_PRECONDITION),
                                      ("never", "no such call", grpc.StatusCode.NOT_FOUND),
                                      ("taken", " ", grpc.StatusCode.INVALID_ARGUMENT),
                                      ("taken", "a\nb", grpc.StatusCode.INVALID_ARGUMENT)]:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await crm.stub.SetAsideDelivery(crm_pb2.SetAsideDeliveryRequest(call_id=call_id, reason=reason))
            assert info.value.code() == code, (call_id, reason)
        assert (await crm.stub.GetDelivery(crm_pb2.GetDeliveryRequest(call_id="taken"))).delivery.state \
            == crm_pb2.DELIVERY_STATE_DELIVERED


async def test_a_record_being_posted_is_set_aside_once_the_crm_has_answered(
        tmp_path: Path, receiver: CrmReceiver) -> None:
    receiver.fail_for = {"slow": 500}
    async with crm_posting(tmp_path, receiver, "slow") as crm:
        aside = asyncio.ensure_future(crm.stub.SetAsideDelivery(
            crm_pb2.SetAsideDeliveryRequest(call_id="slow", reason="ticket 7"), timeout=10))
        await asyncio.sleep(0.3)
        assert not aside.done()  # the CRM has not answered the POST yet
        receiver.hold.set()
        delivery = (await aside).delivery
        assert delivery.state == crm_pb2.DELIVERY_STATE_FAILED and delivery.attempts == 1
        assert delivery.last_error == "set aside: ticket 7"


async def test_a_record_being_posted_is_not_set_aside(tmp_path: Path) -> None:
    # Set aside while the CRM may be taking it, the record could be delivered and reported failed.
    outbox = Outbox(tmp_path / "o.db")
    await outbox.open()
    try:
        await outbox.enqueue("posting", {"call_id": "posting"}, {})
        assert [r.call_id for r in await outbox.claim_due(1, lease_seconds=30)] == ["posting"]
        row, outcome = await outbox.set_aside("posting", "stuck")
        assert outcome == IN_FLIGHT and row is not None and row.state == QUEUED
        await outbox.release(["posting"])
        row, outcome = await outbox.set_aside("posting", "stuck")
        assert outcome == SET_ASIDE and row is not None and row.state == FAILED_ROW
    finally:
        await outbox.close()


async def test_unknown_delivery_is_not_found(tmp_path: Path, receiver: CrmReceiver) -> None:
    async with crm_service(tmp_path / "o.db", receiver) as crm:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await crm.stub.GetDelivery(crm_pb2.GetDeliveryRequest(call_id="never"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    import random

    rng = random.Random(7)
    delays = [backoff_delay(a, 1.0, 30.0, rng) for a in range(10)]
    assert all(0.5 <= d <= 30.0 for d in delays)
    assert max(delays[:2]) <= 2.0 and min(delays[6:]) >= 0.5 and max(delays[6:]) <= 30.0
    assert len(set(delays)) == len(delays)


def record_with_personal_data(call_id: str) -> crm_pb2.CallRecord:
    said = "Mi tarjeta es 4111 1111 1111 1111 y mi correo ana.lopez@example.com."
    r = record(call_id)
    r.transcript = f"Hola. {said} Y el código de seguridad es el 742."
    r.translated_transcript = "Hello. My card is 4111 1111 1111 1111 and my e-mail is ana.lopez@example.com."
    r.summary[1] = "The customer gave the card 4111 1111 1111 1111."
    r.segments.add(index=0, text=" Hola.")
    r.segments.add(index=1, text=f" {said}", words=[common_pb2.Word(text=" 4111", probability=0.9)])
    r.segments.add(index=2, text=" Y el código de seguridad")  # the code's name ends a segment…
    r.segments.add(index=3, text=" es el 742.", words=[common_pb2.Word(text=" 742.", probability=0.9)])  # …its digits
    return r


async def test_personal_data_never_reaches_the_crm_and_the_record_says_where_it_was(
        tmp_path: Path, receiver: CrmReceiver) -> None:
    async with crm_service(tmp_path / "o.db", receiver) as crm:
        answer = await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record_with_personal_data("p1")))
        await wait_state(crm.stub, "p1", crm_pb2.DELIVERY_STATE_DELIVERED)
        raw = json.dumps(receiver.for_call("p1")[0].body)
        assert "4111" not in raw and "ana.lopez" not in raw and "742" not in raw
        body = receiver.for_call("p1")[0].body
        assert body["transcript"] == ("Hola. Mi tarjeta es [CARD_NUMBER] y mi correo [EMAIL_ADDRESS]. Y el código de "
                                      "seguridad es el [SECURITY_CODE].")
        assert body["pii_redaction_applied"] is True
        where = {(r["field"], r["kind"]) for r in body["redactions"]}
        assert where == {(f, k) for f in ("transcript", "translated_transcript", "segments[1].text")
                         for k in ("card_number", "email_address")} | {
            ("summary[1]", "card_number"), ("transcript", "security_code"), ("segments[3].text", "security_code")}
        for r in body["redactions"]:  # each position points at its placeholder
            text = body["summary"][1] if r["field"] == "summary[1]" else (
                body["segments"][int(r["field"][9])]["text"] if r["field"].startswith("segments") else body[r["field"]])
            assert text[r["start"]:r["end"]] == f"[{r['kind'].upper()}]"
        assert body["segments"][2]["text"] == " Y el código de seguridad"  # read as context, left as it is
        assert answer.record.transcript == body["transcript"]  # ingest is told what the CRM gets
        assert not answer.record.segments[1].words and not answer.record.segments[3].words  # they would spell it out
        stored = (await crm.outbox.get("p1")).payload  # nor is it kept in the outbox
        assert "4111" not in json.dumps(stored)


async def test_a_record_masked_before_it_came_lists_where_its_placeholders_stand(
        tmp_path: Path, receiver: CrmReceiver) -> None:
    # Ingest masks the transcript before it stores it (PII_REDACTION): the record comes with placeholders.
    from services.crm.privacy import redact_record
    masked = redact_record(record_with_personal_data("p3"))
    del masked.redactions[:]
    async with crm_service(tmp_path / "o.db", receiver) as crm:
        answer = await crm.stub.Deliver(crm_pb2.DeliverRequest(record=masked))
        await wait_state(crm.stub, "p3", crm_pb2.DELIVERY_STATE_DELIVERED)
        body = receiver.for_call("p3")[0].body
        assert body["transcript"] == masked.transcript and answer.record.transcript == masked.transcript
        first = redact_record(record_with_personal_data("p3"))
        assert [(r["field"], r["kind"], r["start"], r["end"]) for r in body["redactions"]] == [
            (r.field, common_pb2.PiiKind.Name(r.kind).removeprefix("PII_KIND_").lower(), r.start, r.end)
            for r in first.redactions]


def test_a_card_read_out_over_several_segments_is_masked_in_each_and_listed_for_each() -> None:
    from services.crm.privacy import redact_record
    r = record("p4")
    for i, text in enumerate((" Sure.", " 4111.", " 1111.", " 1111.", " 1111.")):
        r.segments.add(index=i, text=text, words=[common_pb2.Word(text=text, probability=0.9)])
    masked = redact_record(r)
    assert [s.text for s in masked.segments] == [" Sure."] + [" [CARD_NUMBER]."] * 4
    assert [(x.field, x.kind, x.start, x.end) for x in masked.redactions if x.field.startswith("segments")] == [
        (f"segments[{i}].text", common_pb2.PII_KIND_CARD_NUMBER, 1, 14) for i in range(1, 5)]
    assert [len(s.words) for s in masked.segments] == [1, 0, 0, 0, 0]  # the words would spell the groups out


def test_a_card_read_out_between_the_agents_words_is_masked_in_each_of_the_customers_segments() -> None:
    from services.crm.privacy import redact_record
    r = record("p5")
    said = [(common_pb2.SPEAKER_CUSTOMER, 1, " 4111."), (common_pb2.SPEAKER_AGENT, 0, " Okay."),
            (common_pb2.SPEAKER_CUSTOMER, 1, " 1111."), (common_pb2.SPEAKER_AGENT, 0, " Yes."),
            (common_pb2.SPEAKER_CUSTOMER, 1, " 1111."), (common_pb2.SPEAKER_AGENT, 0, " Go on."),
            (common_pb2.SPEAKER_CUSTOMER, 1, " 1111.")]
    for i, (speaker, channel, text) in enumerate(said):
        r.segments.add(index=i, text=text, speaker=speaker, channel=channel)
    assert [s.text for s in redact_record(r).segments] == [
        " [CARD_NUMBER].", " Okay.", " [CARD_NUMBER].", " Yes.", " [CARD_NUMBER].", " Go on.", " [CARD_NUMBER]."]


def test_a_card_read_out_between_replies_on_a_mono_call_is_masked_in_the_transcript_where_its_segments_stand(
        ) -> None:
    from services.crm.privacy import redact_record
    said = [" Sure, it's 4111.", " Okay.", " 1111.", " Mm-hmm, go on.", " 1111.", " Yes.", " 1111.", " Thanks."]
    r = record("p6")
    for i, text in enumerate(said):
        r.segments.add(index=i, text=text)
    r.transcript = " ".join(text.strip() for text in said)
    masked = redact_record(r)
    assert masked.transcript == ("Sure, it's [CARD_NUMBER]. Okay. [CARD_NUMBER]. Mm-hmm, go on. [CARD_NUMBER]. Yes. "
                                 "[CARD_NUMBER]. Thanks.")
    listed = [(x.start, x.end) for x in masked.redactions if x.field == "transcript"]
    assert [masked.transcript[s:e] for s, e in listed] == ["[CARD_NUMBER]"] * 4
    assert [x.kind for x in masked.redactions if x.field == "transcript"] == [common_pb2.PII_KIND_CARD_NUMBER] * 4


async def test_redaction_can_be_turned_off(tmp_path: Path, receiver: CrmReceiver) -> None:
    async with crm_service(tmp_path / "o.db", receiver, redact_pii=False) as crm:
        await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record_with_personal_data("p2")))
        await wait_state(crm.stub, "p2", crm_pb2.DELIVERY_STATE_DELIVERED)
        body = receiver.for_call("p2")[0].body
        assert "4111 1111 1111 1111" in body["transcript"]
        assert body["pii_redaction_applied"] is False and body["redactions"] == []


async def test_pipeline_sees_a_record_the_crm_took_at_once_without_waiting_a_poll_interval(
        tmp_path: Path, receiver: CrmReceiver) -> None:
    await analysed_call(tmp_path, "c-quick")
    async with crm_service(tmp_path / "o.db", receiver) as crm:
        # The crm service queues the record and answers before it has sent it; the stand-in CRM takes it
        # in milliseconds. With a minute between polls, only an early first look finishes the call in time.
        async with running_ingest(tmp_path, crm_addr=crm.server.address, delivery_poll_seconds=60) as ingest:
            status = await wait_for_state(ingest.url, "c-quick", {"done", "failed"}, timeout=15)
        assert status["status"] == "done", status
        assert status["delivery"]["state"] == "delivered"
        assert [r.body["transcript"] for r in receiver.for_call("c-quick")] == ["Hola."]


async def test_a_call_the_crm_refused_is_sent_again_when_retried(tmp_path: Path, receiver: CrmReceiver) -> None:
    # The CRM refuses every record (a field it did not know); once that is fixed, the operator retries the
    # failed calls, and each record goes to the CRM again.
    await analysed_call(tmp_path, "c-refused")
    receiver.fail_with = 422
    async with crm_service(tmp_path / "o.db", receiver) as crm:
        async with running_ingest(tmp_path, crm_addr=crm.server.address) as ingest:
            failed = await wait_for_state(ingest.url, "c-refused", {"done", "failed"}, timeout=15)
            assert failed["status"] == "failed" and "HTTP 422" in failed["error"]["message"], failed
            receiver.fail_with = None
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{ingest.url}/v1/calls/c-refused:retry") as resp:
                    assert resp.status == 202
            status = await wait_for_state(ingest.url, "c-refused", {"done", "failed"}, timeout=15)
        assert status["status"] == "done", status
        assert status["delivery"]["state"] == "delivered"
        assert [r.body["transcript"] for r in receiver.for_call("c-refused")] == ["Hola."]


async def set_aside(url: str, call_id: str, body: object) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/calls/{call_id}:setAside", json=body) as resp:
            return resp.status, await resp.json(content_type=None)


async def test_a_call_set_aside_fails_at_delivery_with_the_reason_and_the_calls_behind_it_go_on(
        tmp_path: Path, receiver: CrmReceiver) -> None:
    # The CRM answers 500 to one record and takes every other: the operator sets that call aside, the queue
    # moves on, and once the CRM side is fixed a retry sends the record.
    async with call_held_up_at_the_crm(tmp_path, receiver) as (crm, ingest):
        await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("c-behind")))
        await asyncio.sleep(0.3)
        assert receiver.for_call("c-behind") == []
        status, body = await set_aside(ingest.url, "c-stuck", {"reason": "CRM answers 500 to it, ticket 42"})
        assert status == 202, body
        failed = await wait_for_state(ingest.url, "c-stuck", {"done", "failed"}, timeout=15)
        assert failed["status"] == "failed" and failed["error"]["stage"] == "delivering", failed
        assert "set aside: CRM answers 500 to it, ticket 42" in failed["error"]["message"]
        await wait_state(crm.stub, "c-behind", crm_pb2.DELIVERY_STATE_DELIVERED)
        receiver.fail_for = {}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{ingest.url}/v1/calls/c-stuck:retry") as resp:
                assert resp.status == 202
        done = await wait_for_state(ingest.url, "c-stuck", {"done", "failed"}, timeout=15)
    assert done["status"] == "done", done
    assert [r.body["call_id"] for r in receiver.records] == ["c-behind", "c-stuck"]


async def test_the_command_line_shows_the_crm_error_of_a_call_waiting_for_the_crm(
        tmp_path: Path, receiver: CrmReceiver) -> None:
    async with call_held_up_at_the_crm(tmp_path, receiver) as (_, ingest):
        for command in (["status", "c-stuck"], ["calls", "--status", "delivering"]):
            cli = await asyncio.create_subprocess_exec(
                *CALLMESH, *command, "--url", ingest.url, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env={**os.environ, "COLUMNS": "300", "NO_COLOR": "1"})
            out, err = await asyncio.wait_for(cli.communicate(), 60)
            assert cli.returncode == 0, err.decode()
            assert re.search(r"queued, \d+ attempt\(s\); last: CRM answered HTTP 500", out.decode()), out.decode()


async def test_setting_a_call_aside_needs_a_reason(tmp_path: Path, receiver: CrmReceiver) -> None:
    await stored_call(tmp_path, "c-waiting", FAILED, error_stage=DELIVERING)
    async with running_ingest(tmp_path) as ingest:
        for body in [{}, {"reason": "  "}, {"reason": 42}, ["reason"], {"reason": "ok\n2026-11-27 ERROR forged"}]:
            status, problem = await set_aside(ingest.url, "c-waiting", body)
            assert status == 422 and "reason" in problem["detail"], (body, problem)


async def test_setting_a_call_aside_takes_only_json(tmp_path: Path, receiver: CrmReceiver) -> None:
    # What a form on another site could post from an operator's browser is refused.
    await stored_call(tmp_path, "c-waiting", FAILED, error_stage=DELIVERING)
    async with running_ingest(tmp_path) as ingest:
        async with aiohttp.ClientSession() as session:
            for data, content_type in [("reason=x", "application/x-www-form-urlencoded"),
                                       ('{"reason": "x"}', "text/plain")]:
                async with session.post(f"{ingest.url}/v1/calls/c-waiting:setAside", data=data,
                                        headers={"Content-Type": content_type}) as resp:
                    assert resp.status == 415, content_type


async def test_only_a_call_waiting_for_the_crm_can_be_set_aside(tmp_path: Path, receiver: CrmReceiver) -> None:
    await stored_call(tmp_path, "c-failed", FAILED, error_stage=DELIVERING)
    async with running_ingest(tmp_path) as ingest:
        status, problem = await set_aside(ingest.url, "c-failed", {"reason": "stuck"})
        assert status == 409 and "only a call waiting for the CRM" in problem["detail"], problem
        status, problem = await set_aside(ingest.url, "c-unknown", {"reason": "stuck"})
        assert status == 404, problem


async def test_a_retry_asks_for_the_record_to_be_queued_again_even_when_ingest_never_saw_it_queued(
        tmp_path: Path) -> None:
    # Deliver's answer was lost (a deadline), and the CRM refused the record before ingest asked again.
    job = await stored_call(tmp_path, "c-lost", FAILED, error_stage=DELIVERING, error="crm: CRM refused the record")
    assert job.result is None
    assert PipelineWorker.retry_fields(job) == {"result": {"queued": False, "requeue": True}}


def test_delivery_polls_start_soon_and_slow_down_to_the_configured_interval() -> None:
    assert delivery_poll_delay(0.0, 2.0) == 0.05  # just queued
    assert delivery_poll_delay(0.3, 2.0) == 0.3  # after as long again as the record has waited
    assert delivery_poll_delay(3600.0, 2.0) == 2.0  # a CRM that is down: never more often than DELIVERY_POLL_SECONDS


async def delivery_to(tmp_path: Path, crm_endpoint: Callable[[web.Request], Awaitable[web.Response]], crm_url: str,
                      call_id: str, attempts: int) -> crm_pb2.Delivery:
    """A record delivered to a CRM that answers every request with ``crm_endpoint``, with CRM_URL set to
    ``crm_url`` on it (a path and a query); its delivery once it has had ``attempts`` attempts."""
    app = web.Application()
    app.router.add_route("*", "/{path:.*}", crm_endpoint)
    runner, port = await start_site(app, "127.0.0.1", 0, access_log=None)
    try:
        crm_end = SimpleNamespace(url=f"http://127.0.0.1:{port}{crm_url}")
        async with crm_service(tmp_path / "o.db", crm_end) as crm:  # type: ignore[arg-type]
            await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record(call_id)))
            return await wait_delivery(crm.stub, call_id, lambda d: d.attempts >= attempts)
    finally:
        await runner.cleanup()


async def test_a_crm_url_that_redirects_keeps_the_record_queued_and_says_where_it_points(tmp_path: Path) -> None:
    """The CRM moved its endpoint and answers the old one 301. Following it would send a GET in the POST's place,
    and the new address's page answering that GET with 200 would count as the CRM taking a record it never got."""
    seen: list[str] = []

    async def moved(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        if request.path == "/v1/records":
            raise web.HTTPMovedPermanently("/v2/records")
        return web.Response(text="<html>Records</html>", content_type="text/html")

    d = await delivery_to(tmp_path, moved, "/v1/records", "c-moved", attempts=2)
    assert d.state == crm_pb2.DELIVERY_STATE_QUEUED
    assert "HTTP 301, a redirect to /v2/records" in d.last_error and "set CRM_URL" in d.last_error
    assert set(seen) == {"POST /v1/records"}  # never followed


async def test_an_api_key_in_the_crm_url_stays_out_of_traces_and_delivery_errors(
        tmp_path: Path, finished_spans: InMemorySpanExporter) -> None:
    """Some CRMs take their API key in the query; the redirect's Location here carries one too."""
    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/v2/records?hapikey=moved-key-5678")

    d = await delivery_to(tmp_path, moved, "/v1/records?hapikey=crm-key-1234", "c-keyed", attempts=1)
    assert "a redirect to /v2/records?hapikey=REDACTED" in d.last_error
    told = d.last_error + " ".join(str(value) for span in finished_spans.get_finished_spans()
                                   for value in (span.attributes or {}).values())
    assert "/v1/records?hapikey=REDACTED" in told  # the POST's span, with the URL's shape
    assert "crm-key-1234" not in told and "moved-key-5678" not in told


@pytest.mark.parametrize("url", ["http://crm.example.internal/records", "http://10.1.2.3:8080/records"])
def test_a_crm_url_over_plain_http_to_another_host_is_warned_about(url: str) -> None:
    warning = plaintext_warning(url, token="secret")
    assert warning is not None and "unencrypted" in warning and "CRM_TOKEN" in warning and "use https" in warning
    without_token = plaintext_warning(url, token="")
    assert without_token is not None and "CRM_TOKEN" not in without_token
    with_headers = plaintext_warning(url, token="", headers=True)
    assert with_headers is not None and "CRM_HEADERS go" in with_headers


@pytest.mark.parametrize("url", ["https://crm.example.internal/records", "http://127.0.0.1:9000/records",
                                 "http://localhost/records", "http://[::1]:9000/records"])
def test_a_crm_url_over_https_or_on_this_machine_is_not_warned_about(url: str) -> None:
    assert plaintext_warning(url, token="secret") is None
