"""Personal data said in a call is masked before ingest keeps it (``PII_REDACTION``, on by default).

A customer who pays by phone reads out a card number and its security code, which PCI DSS
forbids keeping. Ingest masks each segment as it comes from Transcribe, before the job store,
the status API, the call's page, the LLM and a later re-analysis see it; the crm service masks
the record again, and lists where each placeholder stands. The real transcribe and crm services
run on loopback; the LLM is the Ollama stand-in, held until the test lets it answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from services.common import pii
from services.ingest.pipeline import SegmentMasking
from tests.audio import CARD_GROUPS
from tests.held_llm import HeldLlmMesh, held_llm_mesh
from tests.ingest_harness import post, wait_for_state
from tests.test_transcribe import engine  # noqa: F401  (the engine fixture)

pytestmark = pytest.mark.models

# What the customer reads out (tests/audio.py, CARD_PAYMENT), as Whisper writes it whichever way it groups the
# digits: the card number (4111 1111 1111 1111), its security code (742) and the phone number (07700 900123).
SAID = ("1111", "742", "0770")


def numbers_in(text: str) -> list[str]:
    """What of ``SAID`` is in ``text``."""
    return [number for number in SAID if number in text]


@pytest_asyncio.fixture
async def mesh(engine, tmp_path: Path, audio_dir: Path, request: pytest.FixtureRequest) -> AsyncIterator[HeldLlmMesh]:
    """Ingest over real transcribe and crm services and an analyze service whose LLM answers only once the test
    sets ``gate``, with the card payment posted and transcribed. The test's ``ingest`` marker names other pipeline
    settings (``redact_pii``, ``translation_source``) and another ``recording``."""
    marker = request.node.get_closest_marker("ingest")
    options = dict(marker.kwargs) if marker else {}
    recording = options.pop("recording", "en-card-payment.wav")
    async with held_llm_mesh(engine, tmp_path, audio_dir, analyses_queued=4, analyze_timeout=120,
                             max_bytes=4 << 20, **options) as held:
        body = json.dumps({"call_id": "pay-1", "recording_url": held.recorder.url_for(recording)})
        assert (await post(held.ingest.url, body))[0] == 202
        await wait_for_state(held.ingest.url, "pay-1", {"analyzing"}, timeout=120)  # transcribed; the LLM holds it
        yield held


async def stored_text(mesh: HeldLlmMesh) -> str:
    job = await mesh.ingest.store.get("pay-1")
    assert job is not None and job.transcript is not None and job.transcript["complete"]
    return " ".join(s["text"] for s in job.transcript["segments"])


async def test_a_card_number_and_its_security_code_are_not_kept_in_the_job_store(mesh: HeldLlmMesh) -> None:
    text = await stored_text(mesh)
    assert numbers_in(text) == [], text
    assert "[SECURITY_CODE]" in text and ("[CARD_NUMBER]" in text or "[ACCOUNT_NUMBER]" in text), text


async def llm_requests(mesh: HeldLlmMesh) -> str:
    """What the LLM was sent, once the call's analysis has reached it."""
    for _ in range(600):
        if mesh.ollama.requests:
            return json.dumps(mesh.ollama.requests)
        await asyncio.sleep(0.1)
    raise AssertionError("the analysis never reached the LLM")


async def test_the_llm_never_reads_the_numbers_the_customer_said(mesh: HeldLlmMesh) -> None:
    assert numbers_in(await llm_requests(mesh)) == []


async def test_the_calls_page_shows_the_transcript_masked_while_the_call_is_analysed(mesh: HeldLlmMesh) -> None:
    page = await call_page(mesh)
    assert "[SECURITY_CODE]" in page and numbers_in(page) == []


async def call_page(mesh: HeldLlmMesh) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{mesh.ingest.url}/calls/pay-1") as response:
        assert response.status == 200
        return await response.text()


async def test_the_crm_record_lists_where_each_number_was_masked(mesh: HeldLlmMesh) -> None:
    mesh.gate.set()
    await wait_for_state(mesh.ingest.url, "pay-1", {"done"}, timeout=60)
    body = mesh.receiver.for_call("pay-1")[0].body
    assert numbers_in(json.dumps(body)) == []
    kinds = {(r["field"], r["kind"]) for r in body["redactions"]}
    assert ("transcript", "security_code") in kinds and ("transcript", "phone_number") in kinds, kinds
    for r in body["redactions"]:
        if r["field"] == "transcript":
            assert body["transcript"][r["start"]:r["end"]] == f"[{r['kind'].upper()}]"


@pytest.mark.ingest(translation_source="whisper", recording="es-phone-number.wav")
async def test_the_speech_models_own_translation_is_masked_before_it_is_kept(mesh: HeldLlmMesh) -> None:
    job = await mesh.ingest.store.get("pay-1")
    assert job is not None and job.transcript is not None and job.transcript["language"] == "es"
    english = " ".join(s["text"] for s in job.transcript["translated_segments"])
    assert "[PHONE_NUMBER]" in english and pii.redact(english)[0] == english, english  # nothing left to mask


@pytest.mark.ingest(recording="en-card-between-replies.wav")
async def test_a_card_read_out_between_the_agents_replies_on_a_mono_call_is_neither_kept_nor_analysed(
        mesh: HeldLlmMesh) -> None:
    text = await stored_text(mesh)
    assert [group for group in CARD_GROUPS if group in text] == [] and "[" in text, text
    assert [group for group in CARD_GROUPS if group in await llm_requests(mesh)] == []


@pytest.mark.ingest(redact_pii=False)
async def test_with_pii_redaction_off_ingest_keeps_the_transcript_as_spoken(mesh: HeldLlmMesh) -> None:
    text = await stored_text(mesh)
    assert numbers_in(text) == list(SAID) and "[SECURITY_CODE]" not in text, text
    assert numbers_in(await llm_requests(mesh)) == list(SAID)
    assert numbers_in(await call_page(mesh)) == list(SAID)


def test_progress_holds_back_the_last_segments_with_figures_until_the_next_ones_show_what_they_are_part_of() -> None:
    masking = SegmentMasking(True)
    for i, text in enumerate(["Can I have the card?", "Sure.", "4111.", "1111."]):
        masking.add({"index": i, "text": text})
    assert [s["text"] for s in masking.settled()] == ["Can I have the card?", "Sure."]  # a card may still come
    for i, text in enumerate(["1111.", "1111.", "Thank you.", "Anything else?", "No."], start=4):
        masking.add({"index": i, "text": text})
    assert [s["text"] for s in masking.settled()] == [
        "Can I have the card?", "Sure.", "[CARD_NUMBER].", "[CARD_NUMBER].", "[CARD_NUMBER].", "[CARD_NUMBER].",
        "Thank you.", "Anything else?", "No."]
    assert masking.settled() == masking.segments


def test_progress_holds_back_a_group_read_out_before_the_agents_short_replies_on_a_mono_call() -> None:
    masking = SegmentMasking(True)
    for i, text in enumerate(["Can I have the card?", "4111.", "Okay.", "Go on.", "Yes.", "Right."]):
        masking.add({"index": i, "text": text})
    assert [s["text"] for s in masking.settled()] == ["Can I have the card?"]  # its next groups may come yet
    for i, text in enumerate(["1111.", "1111.", "1111."], start=6):
        masking.add({"index": i, "text": text})
    assert masking.settled() == masking.segments and masking.segments[1]["text"] == "[CARD_NUMBER]."


def stereo_masking(*said: tuple[str, str]) -> SegmentMasking:
    """Ingest's masking after a stereo call's segments, each ``(speaker, text)``, the agent on the left channel."""
    masking = SegmentMasking(True)
    for i, (speaker, text) in enumerate(said):
        masking.add({"index": i, "speaker": speaker, "channel": int(speaker == "customer"), "text": text})
    return masking


def test_a_card_read_out_to_an_agent_who_acknowledges_each_group_is_masked_in_each_of_the_callers_segments() -> None:
    masking = stereo_masking(("customer", "4111."), ("agent", "Okay."), ("customer", "1111."), ("agent", "Yes."),
                             ("customer", "1111."), ("agent", "Go on."), ("customer", "1111."))
    assert [s["text"] for s in masking.segments] == [
        "[CARD_NUMBER].", "Okay.", "[CARD_NUMBER].", "Yes.", "[CARD_NUMBER].", "Go on.", "[CARD_NUMBER]."]


def test_progress_holds_back_a_speakers_last_segments_with_figures_however_far_back() -> None:
    masking = stereo_masking(("customer", "Sure."), ("customer", "4111."), ("agent", "Okay."), ("agent", "Go on."),
                             ("agent", "Yes."), ("agent", "Right."), ("customer", "1111."))
    assert [s["text"] for s in masking.settled()] == ["Sure."]  # the caller's next groups may make "4111." a card


def test_with_masking_off_segments_are_kept_and_shown_as_they_come() -> None:
    masking = SegmentMasking(False)
    for i, text in enumerate(["4111.", "1111.", "1111.", "1111."]):
        masking.add({"index": i, "text": text})
    assert [s["text"] for s in masking.settled()] == ["4111.", "1111.", "1111.", "1111."]
