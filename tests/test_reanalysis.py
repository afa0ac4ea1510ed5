"""Analysing a done call again (a new taxonomy, prompt or model): the CRM gets a new revision of its record.

The outbox is idempotent on the call, so the new record carries a revision one more than the record the CRM
has; a higher revision replaces the one held, at the back of the queue, under an Idempotency-Key of its own
(the CRM would drop it as a repeat under the old one). The transcript is kept with a done call, so the
recording is not needed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
import pytest_asyncio

from callcenter.v1 import analyze_pb2_grpc, crm_pb2
from callmesh.standins import CrmReceiver
from services.analyze.backends import OllamaBackend
from services.analyze.servicer import AdmissionLimiter, AnalysisServicer
from services.common.grpc_server import ServiceBinding, start_server
from services.crm.outbox import idempotency_key
from services.ingest.store import DONE, FAILED
from tests.cli_mesh import CALLMESH, ROOT
from tests.crm_harness import crm_service, record, start_crm, wait_delivery, wait_state
from tests.ingest_harness import Ingest, running_ingest, stored_call, wait_for
from tests.test_analyze import FakeOllama, analyzer, settings


def revision(call_id: str, n: int) -> crm_pb2.CallRecord:
    r = record(call_id)
    r.revision = n
    return r


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
async def test_a_record_of_a_higher_revision_reaches_the_crm_again_under_a_key_of_its_own(
        tmp_path: Path, receiver: CrmReceiver, engine: str, request: pytest.FixtureRequest) -> None:
    db = tmp_path / "o.db" if engine == "sqlite" else request.getfixturevalue("pg_url")
    async with crm_service(db, receiver) as crm:
        await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("r-1")))
        first = await wait_state(crm.stub, "r-1", crm_pb2.DELIVERY_STATE_DELIVERED)
        again = await crm.stub.Deliver(crm_pb2.DeliverRequest(record=revision("r-1", 2)))
        assert again.delivery.idempotency_key != first.idempotency_key
        await wait_state(crm.stub, "r-1", crm_pb2.DELIVERY_STATE_DELIVERED)
    assert [(r.idempotency_key, r.body["revision"]) for r in receiver.for_call("r-1")] == [
        (idempotency_key("r-1", 1), 1), (idempotency_key("r-1", 2), 2)]


async def test_the_same_or_an_earlier_revision_again_is_the_delivery_the_outbox_has(
        tmp_path: Path, receiver: CrmReceiver) -> None:
    async with crm_service(tmp_path / "o.db", receiver) as crm:
        await crm.stub.Deliver(crm_pb2.DeliverRequest(record=revision("r-2", 2)))
        await wait_state(crm.stub, "r-2", crm_pb2.DELIVERY_STATE_DELIVERED)
        for n in (2, 1):
            answer = await crm.stub.Deliver(crm_pb2.DeliverRequest(record=revision("r-2", n)))
            assert answer.delivery.state == crm_pb2.DELIVERY_STATE_DELIVERED
            assert answer.delivery.idempotency_key == idempotency_key("r-2", 2)
        await asyncio.sleep(0.3)
    assert receiver.posts == 1


async def test_a_higher_revision_waits_while_the_earlier_record_is_being_posted(
        tmp_path: Path, receiver: CrmReceiver) -> None:
    receiver.hold = asyncio.Event()  # the CRM takes its time over the first record
    async with crm_service(tmp_path / "o.db", receiver) as crm:
        await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("r-3")))
        await wait_delivery(crm.stub, "r-3", lambda d: receiver.posts == 1)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await crm.stub.Deliver(crm_pb2.DeliverRequest(record=revision("r-3", 2)))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "being posted" in refused.value.details()
        receiver.hold.set()
        await wait_state(crm.stub, "r-3", crm_pb2.DELIVERY_STATE_DELIVERED)
        await crm.stub.Deliver(crm_pb2.DeliverRequest(record=revision("r-3", 2)))
        await wait_delivery(crm.stub, "r-3", lambda d: len(receiver.for_call("r-3")) == 2)
    assert [r.body["revision"] for r in receiver.for_call("r-3")] == [1, 2]


DONE_CALL = {
    "transcript": {"language": "es", "segments": [
        {"index": 0, "start": 0.0, "end": 2.0, "text": "Me han cobrado dos veces la factura.", "speaker": "unknown"}]},
    "analysis": {"summary": ["a", "b", "c"], "topic": "Other", "sentiment": "neutral", "emotion": "calm"},
    "result": {"queued": True, "record": {"call_id": "done-1", "revision": 1},
               "delivery": {"state": "delivered", "idempotency_key": idempotency_key("done-1", 1)}},
}


@pytest_asyncio.fixture
async def mesh_for_reanalysis(tmp_path: Path, receiver: CrmReceiver) -> AsyncIterator[tuple[Ingest, FakeOllama]]:
    """Ingest over a real analyze service (its LLM a stand-in speaking Ollama's API) and a real crm service, with
    a call done long ago in its job store, whose record the CRM got."""
    await stored_call(tmp_path, "done-1", DONE, **DONE_CALL)
    ollama = await FakeOllama([], by_schema=True).start()
    servicer = AnalysisServicer(analyzer(OllamaBackend(dataclasses.replace(settings(ollama.url)))),
                                AdmissionLimiter(1, 4))
    analyze = await start_server("127.0.0.1:0", [ServiceBinding(
        "callcenter.v1.AnalysisService", lambda s: analyze_pb2_grpc.add_AnalysisServiceServicer_to_server(servicer, s))])
    crm = await start_crm(tmp_path / "outbox.db", receiver)
    await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("done-1")))  # the record the CRM got back then
    await wait_state(crm.stub, "done-1", crm_pb2.DELIVERY_STATE_DELIVERED)
    try:
        async with running_ingest(tmp_path, analyze_addr=analyze.address, crm_addr=crm.server.address) as ingest:
            yield ingest, ollama
    finally:
        await crm.close()
        await analyze.stop(1)
        await ollama.stop()


async def reanalyze(ingest: Ingest, call_id: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{ingest.url}/v1/calls/{call_id}:reanalyze") as resp:
            return resp.status, await resp.json(content_type=None)


async def test_a_done_call_analysed_again_reaches_the_crm_as_its_next_revision(
        mesh_for_reanalysis: tuple[Ingest, FakeOllama], receiver: CrmReceiver) -> None:
    ingest, ollama = mesh_for_reanalysis
    status, body = await reanalyze(ingest, "done-1")
    assert (status, body["status"]) == (202, "analyzing")
    new_key = idempotency_key("done-1", 2)
    done = await wait_for(ingest.url, "done-1", lambda s: s["status"] == FAILED or (
        s["status"] == DONE and (s.get("delivery") or {}).get("idempotency_key") == new_key))
    assert done["status"] == DONE, done
    assert ollama.requests  # the LLM was asked again
    first, sent = receiver.for_call("done-1")
    assert first.body["revision"] == 1
    assert sent.body["revision"] == 2 and sent.idempotency_key == idempotency_key("done-1", 2)
    assert "Me han cobrado" in sent.body["transcript"]


async def test_the_command_line_analyses_every_done_call_again(
        mesh_for_reanalysis: tuple[Ingest, FakeOllama], receiver: CrmReceiver) -> None:
    ingest, _ = mesh_for_reanalysis
    cli = await asyncio.create_subprocess_exec(
        *CALLMESH, "reanalyze", "--all-done", "--url", ingest.url, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "COLUMNS": "300", "NO_COLOR": "1"})
    out, err = await asyncio.wait_for(cli.communicate(), 60)
    assert cli.returncode == 0, err.decode()
    assert "1 call(s) back at analyzing" in out.decode()
    await wait_for(ingest.url, "done-1", lambda s: len(receiver.for_call("done-1")) == 2)
    assert receiver.for_call("done-1")[-1].body["revision"] == 2


@pytest.mark.parametrize(("state", "fields", "reason"), [
    ("delivering", {}, "only a done call"), (FAILED, {"error_stage": "analyzing"}, ":retry"),
    (DONE, {"transcript": None}, "no transcript"),
])
async def test_only_a_done_call_with_its_transcript_is_analysed_again(
        tmp_path: Path, state: str, fields: dict, reason: str) -> None:
    await stored_call(tmp_path, "c-1", state, **{**DONE_CALL, "next_attempt_at": 1e12, **fields})
    async with running_ingest(tmp_path) as ingest:
        status, problem = await reanalyze(ingest, "c-1")
        assert status == 409 and reason in problem["detail"]
        assert (await ingest.store.get("c-1")).state == state


def test_the_command_line_needs_calls_or_all_done(tmp_path: Path) -> None:
    result = subprocess.run([*CALLMESH, "reanalyze"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "CALLMESH_DATA_DIR": str(tmp_path)})
    assert result.returncode == 2 and "--all-done" in result.stderr
