"""The job store and the outbox on PostgreSQL: what several replicas sharing one database rely on.

Each test gets a fresh database on a real PostgreSQL server started on loopback
(``postgres`` fixture); two store objects on the same URL stand for two replicas.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from callmesh.standins import CrmReceiver
from callcenter.v1 import crm_pb2
from services.crm.outbox import DELIVERED, ERASED, IN_FLIGHT, SET_ASIDE, Outbox
from services.ingest.store import DOWNLOADING, RECEIVED, JobOptions, JobStore, LeaseLost
from tests.crm_harness import record, start_crm


@pytest_asyncio.fixture
async def two_stores(pg_url: str) -> AsyncIterator[tuple[JobStore, JobStore]]:
    a, b = JobStore(pg_url), JobStore(pg_url)
    await asyncio.gather(a.open(), b.open())  # both create the schema at once
    yield a, b
    await asyncio.gather(a.close(), b.close())


@pytest_asyncio.fixture
async def two_outboxes(pg_url: str) -> AsyncIterator[tuple[Outbox, Outbox]]:
    a, b = Outbox(pg_url), Outbox(pg_url)
    await asyncio.gather(a.open(), b.open())
    yield a, b
    await asyncio.gather(a.close(), b.close())


async def add_jobs(store: JobStore, n: int) -> list[str]:
    ids = [f"call-{i:03d}" for i in range(n)]
    for call_id in ids:
        await store.create(call_id, f"http://127.0.0.1:9/{call_id}.wav", JobOptions(), {}, "")
    return ids


async def test_two_replicas_never_claim_the_same_job(two_stores: tuple[JobStore, JobStore]) -> None:
    a, b = two_stores
    ids = await add_jobs(a, 60)
    taken: dict[str, list[str]] = {"a": [], "b": []}

    async def drain(name: str, store: JobStore) -> None:
        while jobs := await store.claim(name, 3, 60):
            taken[name] += [j.call_id for j in jobs]

    await asyncio.gather(drain("a", a), drain("b", b), drain("a", a), drain("b", b))
    assert sorted(taken["a"] + taken["b"]) == ids  # every job once, none twice
    assert taken["a"] and taken["b"]  # and both replicas got work


async def test_a_dead_replicas_job_is_taken_over_when_its_lease_expires(two_stores: tuple[JobStore, JobStore]) -> None:
    a, b = two_stores
    await add_jobs(a, 1)
    [job] = await a.claim("replica-a", 1, lease_seconds=0.5)
    assert await b.claim("replica-b", 1, 60) == []  # held
    await asyncio.sleep(0.7)
    [again] = await b.claim("replica-b", 1, 60)
    assert again.call_id == job.call_id
    with pytest.raises(LeaseLost):  # replica a, back from the dead, may not write any more
        await a.update(job.call_id, "replica-a", state=DOWNLOADING)
    await b.update(job.call_id, "replica-b", state=DOWNLOADING)
    assert (await a.get(job.call_id)).state == DOWNLOADING


async def test_one_webhook_posted_to_two_replicas_at_once_makes_one_job(two_stores: tuple[JobStore, JobStore]) -> None:
    a, b = two_stores
    results = await asyncio.gather(*(store.create("call-1", "http://127.0.0.1:9/a.wav", JobOptions(), {}, "",
                                                  webhook_id="msg_1") for store in (a, b, a, b)))
    assert sorted(new for _, new in results) == [False, False, False, True]
    assert {job.call_id for job, _ in results} == {"call-1"}
    assert (await a.counts()) == {RECEIVED: 1}


async def test_arrival_order_and_queue_views_work_on_postgres(two_stores: tuple[JobStore, JobStore]) -> None:
    a, b = two_stores
    ids = await add_jobs(a, 5)
    assert [j.call_id for j in await b.list(limit=10)] == ids[::-1]  # newest first
    assert await b.oldest_active_created_at() == (await a.get(ids[0])).created_at
    due = await b.next_due_at()
    assert due is not None and due <= time.time()


async def test_outbox_replicas_take_turns_with_the_head_of_the_queue(two_outboxes: tuple[Outbox, Outbox]) -> None:
    a, b = two_outboxes
    for i in range(6):
        await (a if i % 2 else b).enqueue(f"call-{i}", {"call_id": f"call-{i}"}, {})
    first = await a.claim_due(3, 60)
    assert [r.call_id for r in first] == ["call-0", "call-1", "call-2"]
    assert await b.claim_due(3, 60) == []  # the head is held: nothing overtakes it
    for r in first:
        await a.mark_delivered(r.call_id)
    assert [r.call_id for r in await b.claim_due(3, 60)] == ["call-3", "call-4", "call-5"]


async def test_a_late_failure_does_not_undo_a_delivery(two_outboxes: tuple[Outbox, Outbox]) -> None:
    a, b = two_outboxes
    await a.enqueue("call-0", {"call_id": "call-0"}, {})
    await b.mark_delivered("call-0")
    await a.mark_failed("call-0", "the replica that lost its lease reports late")
    row = await b.get("call-0")
    assert row is not None and row.state == DELIVERED


async def first_of_two_being_posted(two_outboxes: tuple[Outbox, Outbox]) -> tuple[Outbox, Outbox]:
    """Two records queued; replica ``a`` is posting the first, ``call-0``, to the CRM."""
    a, b = two_outboxes
    for i in range(2):
        await a.enqueue(f"call-{i}", {"call_id": f"call-{i}"}, {})
    assert [r.call_id for r in await a.claim_due(1, 60)] == ["call-0"]
    return a, b


async def test_a_record_another_replica_is_posting_is_set_aside_only_after_that_post(
        two_outboxes: tuple[Outbox, Outbox]) -> None:
    a, b = await first_of_two_being_posted(two_outboxes)
    assert (await b.set_aside("call-0", "CRM bug"))[1] == IN_FLIGHT
    await a.mark_retry("call-0", "CRM answered HTTP 500", time.time() + 60)
    row, outcome = await b.set_aside("call-0", "CRM bug")
    assert outcome == SET_ASIDE and row is not None and row.last_error == "set aside: CRM bug"
    assert [r.call_id for r in await a.claim_due(1, 60)] == ["call-1"]  # the queue moves on


async def test_a_record_another_replica_is_posting_is_erased_only_after_that_post(
        two_outboxes: tuple[Outbox, Outbox]) -> None:
    a, b = await first_of_two_being_posted(two_outboxes)
    assert (await b.erase("call-0"))[1] == IN_FLIGHT
    await a.mark_delivered("call-0")
    row, outcome = await b.erase("call-0")
    assert outcome == ERASED and row is not None and row.state == DELIVERED
    assert await a.get("call-0") is None
    assert [r.call_id for r in await a.claim_due(1, 60)] == ["call-1"]


async def test_two_crm_replicas_deliver_every_record_once_in_order(pg_url: str) -> None:
    receiver = await CrmReceiver().start()
    replicas = [await start_crm(pg_url, receiver), await start_crm(pg_url, receiver)]
    try:
        ids = [f"call-{i:02d}" for i in range(20)]
        for i, call_id in enumerate(ids):  # Deliver alternates between the replicas, as round_robin does
            await replicas[i % 2].stub.Deliver(crm_pb2.DeliverRequest(record=record(call_id)))
        deadline = time.monotonic() + 30
        while len(receiver.records) < len(ids) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert [r.body["call_id"] for r in receiver.records] == ids
        answer = await replicas[1].stub.GetDelivery(crm_pb2.GetDeliveryRequest(call_id=ids[0]))
        assert answer.delivery.state == crm_pb2.DELIVERY_STATE_DELIVERED  # either replica can say
    finally:
        for replica in replicas:
            await replica.close()
        await receiver.stop()


def allow_connections(postgres, pg_url: str, yes: bool) -> None:
    """Let clients connect to the test's database again, or refuse them and end the connections it has, as a
    server that goes down does."""
    import psycopg

    name = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(postgres.admin_url, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS {'true' if yes else 'false'}")
        if not yes:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))


async def test_ingest_is_not_ready_while_its_database_is_unreachable(postgres, pg_url: str, tmp_path) -> None:
    import aiohttp

    from tests.ingest_harness import running_ingest

    async with running_ingest(tmp_path, database=pg_url) as ingest, aiohttp.ClientSession() as session:
        async with session.get(f"{ingest.url}/healthz") as resp:
            assert resp.status == 200
        await asyncio.to_thread(allow_connections, postgres, pg_url, False)
        try:
            async with session.get(f"{ingest.url}/healthz") as resp:
                assert resp.status == 503 and (await resp.json())["status"] == "unavailable"
        finally:
            await asyncio.to_thread(allow_connections, postgres, pg_url, True)
        for _ in range(50):  # the pool reconnects by itself
            async with session.get(f"{ingest.url}/healthz") as resp:
                if resp.status == 200:
                    break
            await asyncio.sleep(0.2)
        assert resp.status == 200


async def test_a_webhook_while_postgresql_refuses_connections_answers_503_and_is_taken_after(
        postgres, pg_url: str, tmp_path) -> None:
    import json
    import time


    from tests.ingest_harness import post, running_ingest

    webhook = json.dumps({"call_id": "pg-down", "recording_url": "http://127.0.0.1:9/a.wav"})
    async with running_ingest(tmp_path, database=pg_url) as ingest:
        await asyncio.to_thread(allow_connections, postgres, pg_url, False)
        try:
            answers = []
            for _ in range(3):  # the pool's broken connections first, then none to be had
                started = time.monotonic()
                status, body = await post(ingest.url, webhook)
                answers.append((status, body, time.monotonic() - started))
        finally:
            await asyncio.to_thread(allow_connections, postgres, pg_url, True)
        for status, body, seconds in answers:
            assert status == 503 and "see the log" in body["detail"], body
            assert seconds < 15  # a few seconds' wait for a connection (CONNECTION_WAIT_SECONDS), not 30
        for _ in range(50):  # the pool reconnects; the recorder sends it again
            status, body = await post(ingest.url, webhook)
            if status == 202:
                break
            await asyncio.sleep(0.2)
        assert status == 202 and (await ingest.store.get("pg-down")) is not None


async def test_callmesh_following_a_call_rides_out_a_status_api_that_answers_503_for_a_while(
        postgres, pg_url: str, tmp_path) -> None:
    import aiohttp

    from callmesh.cli import follow
    from services.ingest.store import DONE, JobOptions, JobStore
    from tests.ingest_harness import running_ingest

    store = JobStore(pg_url)  # a call done before ingest starts: no worker takes it meanwhile
    await store.open()
    try:
        await store.create("followed", "http://127.0.0.1:9/a.wav", JobOptions(), {}, "0" * 32)
        await store.update("followed", None, state=DONE)
    finally:
        await store.close()
    async with running_ingest(tmp_path, database=pg_url) as ingest, aiohttp.ClientSession() as session:
        await asyncio.to_thread(allow_connections, postgres, pg_url, False)
        try:
            following = asyncio.create_task(follow(session, f"{ingest.url}/v1/calls/followed", timeout=120))
            for _ in range(100):  # until the status API has answered 503 at least once
                async with session.get(f"{ingest.url}/v1/calls/followed") as resp:
                    if resp.status == 503:
                        break
            assert resp.status == 503
            assert not following.done()  # still following
        finally:
            await asyncio.to_thread(allow_connections, postgres, pg_url, True)
        status = await asyncio.wait_for(following, 60)
    assert status["status"] == "done"


async def test_a_transaction_retried_after_a_serialization_failure_is_logged_with_its_call(
        two_stores: tuple[JobStore, JobStore], caplog: pytest.LogCaptureFixture) -> None:
    from psycopg import errors

    from services.common.logs import _ContextFilter, call_context

    store, tries = two_stores[0], []

    def conflicting_once(c) -> int:  # what PostgreSQL raises when a concurrent replica wrote the same rows first
        tries.append(1)
        if len(tries) == 1:
            raise errors.SerializationFailure("could not serialize access due to concurrent update")
        return c.execute("SELECT 1").fetchone()[0]

    caplog.handler.addFilter(_ContextFilter("ingest"))  # as setup_logging's handler: the call id where it is logged
    with call_context("call-retried"):
        assert await store.db.transaction(conflicting_once) == 1
    retried = [r for r in caplog.records if r.getMessage().startswith("transaction retried")]
    assert len(tries) == 2 and [r.call_id for r in retried] == ["call-retried"]
