"""The calls web page in headless Chromium (Debian's chromium driven by Playwright).

The processed call comes from `callmesh submit` against `callmesh up` (real
models); the login and live-update behaviour is checked on an in-process ingest.
A screenshot of the call page is written to test-artifacts/ (or
$CALLMESH_TEST_ARTIFACTS) for people to look at.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import unquote

import aiohttp
import pytest
from aiohttp import web
import pytest_asyncio
from playwright.async_api import Browser, Page, async_playwright, expect

from services.common.lifecycle import start_site
from services.ingest.store import JobOptions
from services.ingest.web import PAGE_ROWS, POLL_MS
from tests.cli_mesh import ROOT, UpMesh
from callmesh.standins import CrmReceiver
from tests.ingest_harness import Ingest, post, running_ingest
from tests.crm_harness import call_held_up_at_the_crm

ARTIFACTS = Path(os.environ.get("CALLMESH_TEST_ARTIFACTS", ROOT / "test-artifacts"))


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("chromium is not installed: `apt-get install chromium` (scripts/setup.sh --dev does it)",
                    pytrace=False)
    return path


@pytest_asyncio.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        await b.close()


@pytest_asyncio.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    p = await context.new_page()
    yield p
    await context.close()


@pytest.mark.models
async def test_processed_call_appears_in_the_list(page: Page, up_mesh: UpMesh, stereo_call) -> None:
    record = stereo_call[1]
    await page.goto(up_mesh.ingest_url + "/")
    row = page.locator("tr[data-call='cli-stereo']")
    await expect(row).to_contain_text("done")
    await expect(row).to_contain_text(record["topic"])
    await expect(row).to_contain_text(record["sentiment"])


@pytest.mark.models
async def test_list_filters_by_status(page: Page, up_mesh: UpMesh, stereo_call) -> None:
    await page.goto(up_mesh.ingest_url + "/?status=done")
    statuses = await page.locator("tr[data-call]").evaluate_all("rows => rows.map(r => r.dataset.status)")
    assert statuses and set(statuses) == {"done"}


@pytest.mark.models
async def test_call_page_shows_both_speakers_summary_and_talk_time(page: Page, up_mesh: UpMesh, stereo_call) -> None:
    record = stereo_call[1]
    await page.goto(up_mesh.ingest_url + "/")
    await page.click("text=cli-stereo")
    await expect(page.locator("h1")).to_contain_text("cli-stereo")
    await expect(page.locator("#conversation .turn.agent")).not_to_have_count(0)
    await expect(page.locator("#conversation .turn.customer")).not_to_have_count(0)
    await expect(page.locator("#conversation .turn.agent").first).to_contain_text("Agent")
    await expect(page.locator("#summary li")).to_have_count(3)
    for line in record["summary"]:
        await expect(page.locator("#summary")).to_contain_text(line)
    await expect(page.locator("#talk-time .bar")).to_have_count(2)
    await expect(page.locator("#topic")).to_have_text(record["topic"])
    await expect(page.locator("#metadata")).to_have_text("agent_id: A-42 · queue: sales=EU")  # the recorder's fields
    await expect(page.locator("#timeline li")).to_have_count(6)
    await expect(page.locator("#trace")).not_to_be_empty()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "call-page.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


async def test_call_page_follows_a_call_in_progress(page: Page, ingest: Ingest) -> None:
    await ingest.worker.stop(1)  # the test moves the call along itself
    status, _ = await post(ingest.url, '{"call_id": "live-1", "recording_url": "http://127.0.0.1:9/a.wav"}')
    assert status == 202
    await page.goto(f"{ingest.url}/calls/live-1")
    await expect(page.locator("#status")).to_have_text("received")
    await ingest.store.update("live-1", None, state="downloading")
    await expect(page.locator("#status")).to_have_text("downloading", timeout=10_000)  # no manual reload
    await ingest.store.update("live-1", None, state="failed", error="stopped by the test", error_stage="downloading")
    await expect(page.locator("#status")).to_have_text("failed", timeout=10_000)
    await expect(page.locator("#error")).to_contain_text("stopped by the test")


async def test_call_page_says_a_recording_without_speech_has_none(page: Page, ingest: Ingest) -> None:
    await ingest.worker.stop(1)  # the test stores the transcript as the pipeline does
    status, _ = await post(ingest.url, '{"call_id": "silent-1", "recording_url": "http://127.0.0.1:9/a.wav"}')
    assert status == 202
    await ingest.store.update("silent-1", None, state="transcribing", transcript={
        "language": "", "segments": [], "complete": False})
    await page.goto(f"{ingest.url}/calls/silent-1")
    await expect(page.locator("#conversation")).to_contain_text("No speech yet.")
    await ingest.store.update("silent-1", None, state="done", transcript={
        "language": "", "segments": [], "complete": True, "audio_duration": 30.0})
    await expect(page.locator("#conversation")).to_contain_text("No speech in the recording.", timeout=10_000)
    await expect(page.locator("#translation")).to_contain_text("Nothing to translate.")


async def test_call_page_says_how_much_of_the_recording_is_transcribed(page: Page, ingest: Ingest) -> None:
    await ingest.worker.stop(1)  # the test stores the transcript as the pipeline does
    status, _ = await post(ingest.url, '{"call_id": "long-1", "recording_url": "http://127.0.0.1:9/a.wav"}')
    assert status == 202
    await ingest.store.update("long-1", None, state="transcribing", transcript={
        "language": "en", "audio_duration": 600.0, "complete": False, "segments": [
            {"index": 0, "start": 1.0, "end": 4.5, "speaker": "unknown", "channel": 0, "text": " Hello."},
            {"index": 1, "start": 70.0, "end": 75.2, "speaker": "unknown", "channel": 0, "text": " Still there?"}]})
    await page.goto(f"{ingest.url}/calls/long-1")
    await expect(page.locator("#transcribed")).to_have_text("Transcribed up to 1:15.2 of 10:00.0.")
    await ingest.store.update("long-1", None, state="analyzing", transcript={
        "language": "en", "audio_duration": 600.0, "complete": True, "segments": []})
    await expect(page.locator("#status")).to_have_text("analyzing", timeout=10_000)
    await expect(page.locator("#transcribed")).to_have_count(0)


async def test_call_page_says_whether_a_worker_is_on_the_call(page: Page, ingest: Ingest) -> None:
    await ingest.worker.stop(1)  # the test takes and hands back the call itself
    status, _ = await post(ingest.url, '{"call_id": "turn-1", "recording_url": "http://127.0.0.1:9/a.wav"}')
    assert status == 202
    await page.goto(f"{ingest.url}/calls/turn-1")
    await expect(page.locator("#activity")).to_have_text("waiting for a free worker")
    assert [job.call_id for job in await ingest.store.claim("test-worker", 1, 60)] == ["turn-1"]
    await expect(page.locator("#activity")).to_have_text("in progress", timeout=10_000)  # no manual reload
    await ingest.store.update("turn-1", "test-worker", release=True, error="recorder answered 503",
                              next_attempt_at=time.time() + 600)
    await expect(page.locator("#activity")).to_contain_text("next attempt at", timeout=10_000)
    await expect(page.locator("#error")).to_contain_text("recorder answered 503")


async def test_call_page_says_what_the_crm_answers_a_call_waiting_for_it(page: Page, ingest: Ingest) -> None:
    await ingest.worker.stop(1)  # the test stores the delivery's state as the pipeline does
    status, _ = await post(ingest.url, '{"call_id": "crm-1", "recording_url": "http://127.0.0.1:9/a.wav"}')
    assert status == 202
    await ingest.store.update("crm-1", None, state="delivering", next_attempt_at=time.time() + 600, result={
        "queued": True, "delivery": {"state": "queued", "attempts": 7, "last_error": "CRM answered HTTP 500: boom",
                                     "idempotency_key": "k"}})
    await page.goto(f"{ingest.url}/calls/crm-1")
    await expect(page.locator("#activity")).to_have_text(
        "waiting for the CRM: 7 attempt(s), last: CRM answered HTTP 500: boom")


async def test_a_failed_call_is_retried_from_its_page(page: Page, ingest: Ingest) -> None:
    await ingest.worker.stop(1)  # the call stays where the retry puts it
    status, _ = await post(ingest.url, '{"call_id": "again-1", "recording_url": "http://127.0.0.1:9/a.wav"}')
    assert status == 202
    await ingest.store.update("again-1", None, state="failed", error="recorder answered 404",
                              error_stage="downloading")
    await page.goto(f"{ingest.url}/calls/again-1")
    await page.locator("#retry").click()
    await expect(page.locator("#status")).to_have_text("downloading", timeout=10_000)


async def test_a_done_call_is_analysed_again_from_its_page(page: Page, ingest: Ingest) -> None:
    await ingest.worker.stop(1)  # the call stays where the button puts it
    status, _ = await post(ingest.url, '{"call_id": "again-2", "recording_url": "http://127.0.0.1:9/a.wav"}')
    assert status == 202
    await ingest.store.update("again-2", None, state="done", transcript={"language": "es", "segments": []},
                              result={"record": {"call_id": "again-2", "revision": 1}})
    await page.goto(f"{ingest.url}/calls/again-2")
    await expect(page.locator("#reanalyze-card")).to_contain_text("revision 1")
    await page.locator("#reanalyze").click()
    await expect(page.locator("#status")).to_have_text("analyzing", timeout=10_000)
    assert (await ingest.store.get("again-2")).result == {"revision": 2}


async def test_a_form_on_another_site_cannot_retry_a_call(page: Page, ingest: Ingest) -> None:
    await ingest.worker.stop(1)  # the call would stay where a retry puts it
    status, _ = await post(ingest.url, '{"call_id": "xsite-1", "recording_url": "http://127.0.0.1:9/a.wav"}')
    assert status == 202
    await ingest.store.update("xsite-1", None, state="failed", error="recorder answered 404",
                              error_stage="downloading")

    async def elsewhere(request: web.Request) -> web.Response:  # a page of some other web site the operator opens
        return web.Response(content_type="text/html", text=f"<form method='post' action='{ingest.url}/v1/calls/"
                            "xsite-1:retry'><button id='go' type='submit'>Win a prize</button></form>")

    app = web.Application()
    app.router.add_get("/", elsewhere)
    runner, port = await start_site(app, "127.0.0.1", 0)
    try:
        await page.goto(f"http://localhost:{port}/")  # localhost and 127.0.0.1 are two sites to the browser
        async with page.expect_response(lambda r: r.url.endswith(":retry")) as answer:
            await page.locator("#go").click()
        assert (await answer.value).status == 403
    finally:
        await runner.cleanup()
    assert (await ingest.store.get("xsite-1")).state == "failed"


async def test_a_call_the_crm_keeps_failing_on_is_set_aside_from_its_page(
        page: Page, tmp_path: Path, receiver: CrmReceiver) -> None:
    async with call_held_up_at_the_crm(tmp_path, receiver) as (_, ingest):
        await page.goto(f"{ingest.url}/calls/c-stuck")
        await page.locator("#set-aside").click()  # no reason given
        await expect(page.locator("#action-error")).to_contain_text("reason")
        await page.locator("#reason").fill("CRM answers 500 to it, ticket 9")
        await page.locator("#set-aside").click()
        await expect(page.locator("#status")).to_have_text("failed", timeout=10_000)
        await expect(page.locator("#error")).to_contain_text("set aside: CRM answers 500 to it, ticket 9")


async def test_call_list_follows_a_worker_taking_up_a_call(page: Page, ingest: Ingest) -> None:
    await ingest.worker.stop(1)
    for call_id in ("queue-1", "queue-2"):
        status, _ = await post(ingest.url, f'{{"call_id": "{call_id}", "recording_url": "http://127.0.0.1:9/a.wav"}}')
        assert status == 202
    await page.goto(ingest.url + "/")
    for call_id in ("queue-1", "queue-2"):
        await expect(page.locator(f"tr[data-call='{call_id}'] .activity")).to_have_text("waiting for a free worker")
    assert [job.call_id for job in await ingest.store.claim("test-worker", 1, 60)] == ["queue-1"]
    await expect(page.locator("tr[data-call='queue-1'] .activity")).to_have_text("in progress", timeout=10_000)
    await expect(page.locator("tr[data-call='queue-2'] .activity")).to_have_text("waiting for a free worker")


async def queued(ingest: Ingest, *calls: tuple[str, dict[str, str] | None]) -> None:
    """Calls taken by the webhook (with the recorder's ``metadata``) that no worker takes up."""
    await ingest.worker.stop(1)
    for call_id, metadata in calls:
        body = {"call_id": call_id, "recording_url": "http://127.0.0.1:9/a.wav", "metadata": metadata}
        status, _ = await post(ingest.url, json.dumps({k: v for k, v in body.items() if v is not None}))
        assert status == 202


async def test_a_call_is_found_by_its_id_from_the_list(page: Page, ingest: Ingest) -> None:
    await queued(ingest, ("a84b4c76e66710@pc33.example", None), ("other-1", None))
    await page.goto(ingest.url + "/")
    await page.fill("input[name=find]", " a84b4c76e66710@pc33.example ")  # pasted with the spaces around it
    await page.click(".find button[type=submit]")
    await expect(page.locator("h1")).to_contain_text("a84b4c76e66710@pc33.example")
    assert unquote(page.url) == f"{ingest.url}/calls/a84b4c76e66710@pc33.example"


async def test_a_call_id_that_is_not_there_is_said_so_on_the_list(page: Page, ingest: Ingest) -> None:
    await queued(ingest, ("other-1", None))
    await page.goto(ingest.url + "/?find=erased-7")
    await expect(page.locator("#not-found")).to_contain_text("There is no call erased-7")
    await expect(page.locator("input[name=find]")).to_have_value("erased-7")


async def test_a_search_for_what_no_call_id_can_hold_says_there_is_no_such_call_on_postgresql(
        tmp_path: Path, pg_url: str) -> None:
    async with running_ingest(tmp_path, database=pg_url) as ingest, aiohttp.ClientSession() as session:
        async with session.get(f"{ingest.url}/", params={"find": "a\x00b"}) as resp:
            assert resp.status == 200 and "There is no call a" in await resp.text()


async def test_calls_are_found_by_a_field_of_the_recorders_metadata(page: Page, ingest: Ingest) -> None:
    await queued(ingest, ("ani-1", {"ani": "+34600123456", "queue": "billing"}), ("ani-2", {"ani": "+34600999999"}),
                 ("ani-3", {"ani": "+34600123456"}), ("ani-4", None))
    await page.goto(ingest.url + "/")
    await page.fill("input[name=find]", "ani=+34600123456")
    await page.click(".find button[type=submit]")
    rows = page.locator("tr[data-call]")
    await expect(rows).to_have_count(2)
    assert await rows.evaluate_all("rows => rows.map(r => r.dataset.call)") == ["ani-3", "ani-1"]  # newest first
    # The live update asks the status API for the same calls: the page is not reloaded while none changes.
    await page.evaluate("window.unchanged = true")
    await page.wait_for_timeout(POLL_MS * 2)
    assert await page.evaluate("window.unchanged === true")


async def test_the_list_shows_older_calls_page_by_page(page: Page, ingest: Ingest) -> None:
    await ingest.worker.stop(1)
    for n in range(PAGE_ROWS + 3):
        await ingest.store.create(f"page-{n:03d}", "http://127.0.0.1:9/a.wav", JobOptions(), {}, "0" * 32)
    await page.goto(ingest.url + "/")
    await expect(page.locator("tr[data-call]")).to_have_count(PAGE_ROWS)
    await expect(page.locator("tr[data-call]").first).to_have_attribute("data-call", f"page-{PAGE_ROWS + 2:03d}")
    await expect(page.locator("#newer")).to_have_count(0)
    await page.click("#older")
    assert await page.locator("tr[data-call]").evaluate_all("rows => rows.map(r => r.dataset.call)") == [
        "page-002", "page-001", "page-000"]
    await expect(page.locator("#older")).to_have_count(0)
    await page.click("#newer")
    await expect(page.locator("tr[data-call]")).to_have_count(PAGE_ROWS)


async def test_the_page_of_a_call_that_is_not_there_says_so_with_a_404(page: Page, ingest: Ingest) -> None:
    response = await page.goto(f"{ingest.url}/calls/erased-1")
    assert response is not None and response.status == 404
    await expect(page.locator("h1")).to_have_text("No call erased-1")


async def test_pages_need_the_api_token_when_one_is_set(page: Page, tmp_path: Path) -> None:
    async with running_ingest(tmp_path, api_token="s3cret") as ingest:
        await page.goto(ingest.url + "/")
        await expect(page.locator("h1")).to_have_text("Sign in")
        await page.fill("input[name=token]", "wrong")
        await page.click("button[type=submit]")
        await expect(page.locator("body")).to_contain_text("not right")
        await page.goto(ingest.url + "/")
        await page.fill("input[name=token]", "s3cret")
        await page.click("button[type=submit]")
        await expect(page.locator("h1")).to_have_text("Calls")
        # The cookie the page set lets its own scripts read the status API; nobody else gets in.
        async with aiohttp.ClientSession() as session:
            async with session.get(ingest.url + "/v1/calls") as resp:
                assert resp.status == 401
            async with session.get(ingest.url + "/", allow_redirects=False) as resp:
                assert resp.status == 303 and resp.headers["Location"].startswith("/login")
