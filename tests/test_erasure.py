"""How long Callmesh keeps a call once the CRM has its record, and erasing a call on request.

A done call stays in ingest's job store, and its record in crm's outbox, for CALL_RETENTION_DAYS;
a failed call stays until it is retried. A caller who asks that their data be erased gets it erased
at once: `DELETE /v1/calls/{id}` (or `callmesh erase`) takes the call out of both, with a failed
call's recording; the crm service's DeleteDelivery does its part. A caller is known by a number, so
their calls are found by the recorder's metadata (`?metadata=KEY=VALUE`, `callmesh erase --meta`). Real ingest and crm services on
127.0.0.1, the stand-in CRM receiver behind them.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import aiohttp
import grpc
import pytest

from callcenter.v1 import crm_pb2
from callmesh.standins import CrmReceiver
from services.ingest.store import DONE, DOWNLOADING, FAILED, TRANSCRIBING, JobOptions
from tests.cli_mesh import CALLMESH, ROOT
from tests.crm_harness import (
    analysed_call, call_held_up_at_the_crm, crm_posting, crm_service, record, wait_delivery, wait_state)
from tests.ingest_harness import Ingest, running_ingest, stored_call, wait_for_state


async def status_code(url: str, call_id: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/v1/calls/{call_id}") as resp:
            return resp.status


async def test_a_call_done_longer_ago_than_its_retention_is_deleted(tmp_path: Path) -> None:
    await stored_call(tmp_path, "done-long-ago", DONE)
    await stored_call(tmp_path, "failed-long-ago", FAILED, error="recorder answered 404", error_stage=DOWNLOADING)
    await asyncio.sleep(1.0)
    await stored_call(tmp_path, "done-just-now", DONE)
    async with running_ingest(tmp_path, done_retention=0.8) as ingest:  # looked at when ingest starts
        for _ in range(100):
            if await status_code(ingest.url, "done-long-ago") == 404:
                break
            await asyncio.sleep(0.05)
        assert await status_code(ingest.url, "done-long-ago") == 404
        assert await status_code(ingest.url, "done-just-now") == 200
        assert await status_code(ingest.url, "failed-long-ago") == 200  # a dead letter waits for its operator


async def test_a_delivered_record_is_deleted_once_its_retention_is_over(tmp_path: Path, receiver: CrmReceiver) -> None:
    async with crm_service(tmp_path / "o.db", receiver) as crm:  # the default retention: 90 days
        await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("delivered-early")))
        await wait_state(crm.stub, "delivered-early", crm_pb2.DELIVERY_STATE_DELIVERED)
        await asyncio.sleep(3.5)
        for call_id, answer in (("delivered-late", None), ("refused", 422), ("stuck", 500)):
            receiver.fail_for = {call_id: answer} if answer else {}
            await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record(call_id)))
            await wait_delivery(crm.stub, call_id, lambda d: d.state != crm_pb2.DELIVERY_STATE_QUEUED or d.attempts)
    async with crm_service(tmp_path / "o.db", receiver, delivered_retention=3.0) as crm:
        for _ in range(40):
            if await crm.outbox.get("delivered-early") is None:
                break
            await asyncio.sleep(0.05)
        assert await crm.outbox.get("delivered-early") is None
        states = {call_id: (await crm.outbox.get(call_id)).state for call_id in ("delivered-late", "refused", "stuck")}
        assert states == {"delivered-late": "delivered", "refused": "failed", "stuck": "queued"}


async def erase(url: str, call_id: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.delete(f"{url}/v1/calls/{call_id}") as resp:
            return resp.status, (await resp.json(content_type=None)) if resp.status != 204 else {}


async def test_an_erased_record_is_gone_from_the_outbox(tmp_path: Path, receiver: CrmReceiver) -> None:
    async with crm_service(tmp_path / "o.db", receiver) as crm:
        await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("c-1")))
        await wait_state(crm.stub, "c-1", crm_pb2.DELIVERY_STATE_DELIVERED)
        erased = await crm.stub.DeleteDelivery(crm_pb2.DeleteDeliveryRequest(call_id="c-1"))
        assert erased.delivery.state == crm_pb2.DELIVERY_STATE_DELIVERED
        assert await crm.outbox.get("c-1") is None
        for call_id, code in (("c-1", grpc.StatusCode.NOT_FOUND), ("", grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await crm.stub.DeleteDelivery(crm_pb2.DeleteDeliveryRequest(call_id=call_id))
            assert info.value.code() == code
    assert len(receiver.for_call("c-1")) == 1  # the CRM's copy is the CRM's


async def test_an_erased_queued_record_never_reaches_the_crm_and_the_queue_moves_on(
        tmp_path: Path, receiver: CrmReceiver) -> None:
    receiver.fail_for = {"c-stuck": 500}
    async with crm_service(tmp_path / "o.db", receiver) as crm:
        for call_id in ("c-stuck", "c-behind"):
            await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record(call_id)))
        await wait_delivery(crm.stub, "c-stuck", lambda d: d.attempts >= 1)
        await crm.stub.DeleteDelivery(crm_pb2.DeleteDeliveryRequest(call_id="c-stuck"), timeout=10)
        receiver.fail_for = {}
        await wait_state(crm.stub, "c-behind", crm_pb2.DELIVERY_STATE_DELIVERED)
        await asyncio.sleep(0.3)
    assert [r.body["call_id"] for r in receiver.records] == ["c-behind"]


async def test_a_record_being_posted_is_erased_once_the_crm_has_answered(
        tmp_path: Path, receiver: CrmReceiver) -> None:
    async with crm_posting(tmp_path, receiver, "slow") as crm:
        erasing = asyncio.ensure_future(crm.stub.DeleteDelivery(crm_pb2.DeleteDeliveryRequest(call_id="slow"),
                                                                timeout=10))
        await asyncio.sleep(0.3)
        assert not erasing.done() and await crm.outbox.get("slow") is not None  # the POST has no answer yet
        receiver.hold.set()
        assert (await erasing).delivery.state == crm_pb2.DELIVERY_STATE_DELIVERED
        assert await crm.outbox.get("slow") is None


async def test_an_erased_call_is_gone_from_ingest_and_the_outbox(tmp_path: Path, receiver: CrmReceiver) -> None:
    await analysed_call(tmp_path, "c-erase")
    async with crm_service(tmp_path / "o.db", receiver) as crm:
        async with running_ingest(tmp_path, crm_addr=crm.server.address) as ingest:
            assert (await wait_for_state(ingest.url, "c-erase", {"done", "failed"}))["status"] == "done"
            assert await erase(ingest.url, "c-erase") == (204, {})
            assert await ingest.store.get("c-erase") is None
            assert await crm.outbox.get("c-erase") is None
            status, body = await erase(ingest.url, "c-erase")
            assert status == 404, body


async def test_a_call_that_failed_before_delivery_is_erased_with_its_recording(tmp_path: Path) -> None:
    recording = tmp_path / "recordings" / "5555.audio"
    recording.parent.mkdir(parents=True)
    recording.write_bytes(b"RIFF")
    await stored_call(tmp_path, "c-failed", FAILED, error_stage=TRANSCRIBING, error="transcribe: INVALID_ARGUMENT",
                      recording_path=str(recording))
    async with running_ingest(tmp_path, rpc_timeout=0.5) as ingest:  # its record never reached the crm service
        assert await erase(ingest.url, "c-failed") == (204, {})
        assert await ingest.store.get("c-failed") is None
    assert not recording.exists()


async def test_a_call_set_aside_is_erased_from_the_outbox_too(tmp_path: Path, receiver: CrmReceiver) -> None:
    async with call_held_up_at_the_crm(tmp_path, receiver) as (crm, ingest):
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{ingest.url}/v1/calls/c-stuck:setAside", json={"reason": "ticket 5"}) as resp:
                assert resp.status == 202
        failed = await wait_for_state(ingest.url, "c-stuck", {"done", "failed"}, timeout=15)
        assert failed["error"]["stage"] == "delivering", failed
        assert await crm.outbox.get("c-stuck") is not None
        assert await erase(ingest.url, "c-stuck") == (204, {})
        assert await crm.outbox.get("c-stuck") is None and await ingest.store.get("c-stuck") is None


async def test_a_call_in_the_pipeline_cannot_be_erased(tmp_path: Path) -> None:
    await stored_call(tmp_path, "c-working", "analyzing")
    async with running_ingest(tmp_path) as ingest:
        await ingest.worker.stop(1)
        status, body = await erase(ingest.url, "c-working")
        assert status == 409 and "only a done or failed call" in body["detail"]
        assert await ingest.store.get("c-working") is not None


async def test_nothing_is_erased_while_the_crm_service_does_not_answer(tmp_path: Path) -> None:
    await stored_call(tmp_path, "c-done", DONE)
    async with running_ingest(tmp_path, rpc_timeout=0.5) as ingest:  # no crm service at its address
        status, body = await erase(ingest.url, "c-done")
        assert status == 503, body
        assert await ingest.store.get("c-done") is not None


async def test_the_command_line_erases_a_call(tmp_path: Path, receiver: CrmReceiver) -> None:
    await stored_call(tmp_path, "c-cli", DONE)
    async with crm_service(tmp_path / "o.db", receiver) as crm:
        async with running_ingest(tmp_path, crm_addr=crm.server.address) as ingest:
            cli = await asyncio.create_subprocess_exec(
                *CALLMESH, "erase", "c-cli", "--yes", "--url", ingest.url, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env={**os.environ, "COLUMNS": "300", "NO_COLOR": "1"})
            out, err = await asyncio.wait_for(cli.communicate(), 60)
            assert cli.returncode == 0, err.decode()
            assert "c-cli is erased" in out.decode()
            assert await ingest.store.get("c-cli") is None


async def test_every_call_of_a_caller_is_erased_by_the_number_the_recorder_gave(
        tmp_path: Path, receiver: CrmReceiver) -> None:
    """A caller asks that their data be erased; they are known by their number, not by call ids."""
    theirs = JobOptions(metadata={"ani": "+34 600 123 456"})
    for call_id, state, options in (("mine-1", DONE, theirs), ("mine-2", FAILED, theirs),
                                    ("someone-else", DONE, JobOptions(metadata={"ani": "+34 600 999 999"}))):
        await stored_call(tmp_path, call_id, state, options=options)
    async with crm_service(tmp_path / "o.db", receiver) as crm:
        async with running_ingest(tmp_path, crm_addr=crm.server.address) as ingest:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{ingest.url}/v1/calls", params={"metadata": "ani=+34 600 123 456"}) as resp:
                    listed = [c["call_id"] for c in (await resp.json())["calls"]]
            assert sorted(listed) == ["mine-1", "mine-2"]
            cli = await asyncio.create_subprocess_exec(
                *CALLMESH, "erase", "--meta", "ani=+34 600 123 456", "--yes", "--url", ingest.url, cwd=ROOT,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "COLUMNS": "300", "NO_COLOR": "1"})
            out, err = await asyncio.wait_for(cli.communicate(), 60)
            assert cli.returncode == 0, err.decode()
            assert "mine-1 is erased" in out.decode() and "mine-2 is erased" in out.decode()
            assert [await ingest.store.get(c) is None for c in ("mine-1", "mine-2", "someone-else")] == [
                True, True, False]


@pytest.mark.parametrize("query", ["ani", "=+34", "bad key=1", "ani=" + "9" * 1025, "ani=+34\x00"])
async def test_a_metadata_filter_that_is_not_key_equals_value_is_refused(ingest: Ingest, query: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{ingest.url}/v1/calls", params={"metadata": query}) as resp:
            assert resp.status == 400 and "KEY=VALUE" in (await resp.json(content_type=None))["detail"]


@pytest.mark.parametrize(("args", "reason"), [
    (["erase"], "--meta KEY=VALUE"), (["erase", "c-1", "--meta", "ani=1"], "--meta KEY=VALUE"),
    (["erase", "--meta", "ani"], "use --meta KEY=VALUE"), (["calls", "--meta", "ani"], "use --meta KEY=VALUE"),
])
def test_the_command_line_needs_one_call_or_a_metadata_value(tmp_path: Path, args: list[str], reason: str) -> None:
    result = subprocess.run([*CALLMESH, *args, "--url", "http://127.0.0.1:9"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "CALLMESH_DATA_DIR": str(tmp_path),
                                                        "COLUMNS": "300", "NO_COLOR": "1"})
    assert result.returncode == 2 and reason in result.stderr, result.stderr
