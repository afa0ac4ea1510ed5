"""Standard Webhooks signatures on POST /v1/calls, against a real ingest on 127.0.0.1 port 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from callmesh.standins import new_webhook_secret, signed_headers
from services.common.config import ConfigError
from services.ingest.signatures import WebhookVerifier
from tests.ingest_harness import SECRET, Ingest, post, running_ingest

ROOT = Path(__file__).resolve().parents[1]


def webhook(call_id: str) -> bytes:
    return json.dumps({"call_id": call_id, "recording_url": "http://127.0.0.1:1/a.wav"}).encode()


async def assert_refused(ingest: Ingest, body: bytes, headers: dict[str, str], reason: str) -> None:
    status, problem = await post(ingest.url, body, headers=headers)
    assert status == 401
    assert reason in problem["detail"]
    assert await ingest.store.counts() == {}


async def test_unsigned_webhook_is_401_and_stores_nothing(ingest: Ingest) -> None:
    await assert_refused(ingest, webhook("u-1"), {}, "missing signature header(s): webhook-id, webhook-timestamp")


async def test_webhook_signed_with_another_secret_is_401(ingest: Ingest) -> None:
    body = webhook("w-1")
    await assert_refused(ingest, body, signed_headers(new_webhook_secret(), body), "no signature matches")


async def test_body_changed_after_signing_is_401(ingest: Ingest) -> None:
    headers = signed_headers(SECRET, webhook("t-1"))
    await assert_refused(ingest, webhook("t-2"), headers, "no signature matches")


async def test_webhook_older_than_five_minutes_is_401_as_stale(ingest: Ingest) -> None:
    body = webhook("old-1")
    await assert_refused(ingest, body, signed_headers(SECRET, body, timestamp=time.time() - 301), "stale")


async def test_webhook_from_the_future_is_401(ingest: Ingest) -> None:
    body = webhook("new-1")
    await assert_refused(ingest, body, signed_headers(SECRET, body, timestamp=time.time() + 400), "future")


@pytest.mark.parametrize("signature", ["garbage", "v1,", "v1,!!notbase64!!", "v2,AAAA", "v1,a,b"])
async def test_malformed_signature_header_is_401(ingest: Ingest, signature: str) -> None:
    body = webhook("m-1")
    headers = {**signed_headers(SECRET, body), "webhook-signature": signature}
    status, problem = await post(ingest.url, body, headers=headers)
    assert status == 401 and problem["detail"]
    assert await ingest.store.counts() == {}


async def test_signature_within_five_minutes_is_accepted(ingest: Ingest) -> None:
    body = webhook("late-1")
    status, _ = await post(ingest.url, body, headers=signed_headers(SECRET, body, timestamp=time.time() - 280))
    assert status == 202


async def test_replayed_webhook_id_is_acknowledged_and_not_processed_again(ingest: Ingest) -> None:
    body = webhook("r-1")
    headers = signed_headers(SECRET, body, webhook_id="msg_replayed")
    first = await post(ingest.url, body, headers=headers)
    again = await post(ingest.url, body, headers=headers)
    assert [first[0], again[0]] == [202, 202]
    assert (first[1]["duplicate"], again[1]["duplicate"]) == (False, True)
    assert sum((await ingest.store.counts()).values()) == 1


async def test_webhook_id_seen_before_is_not_a_new_call_even_with_another_body(ingest: Ingest) -> None:
    await post(ingest.url, webhook("first"), headers=signed_headers(SECRET, webhook("first"), webhook_id="msg_1"))
    status, ack = await post(ingest.url, webhook("second"),
                             headers=signed_headers(SECRET, webhook("second"), webhook_id="msg_1"))
    assert status == 202 and ack["call_id"] == "first" and ack["duplicate"] is True
    assert await ingest.store.get("second") is None


async def test_both_secrets_are_accepted_during_rotation(tmp_path: Path) -> None:
    old, new = new_webhook_secret(), new_webhook_secret()
    rotating = WebhookVerifier.from_secrets((new, old))
    async with running_ingest(tmp_path, rotating) as ingest:
        for call_id, secret in (("rot-old", old), ("rot-new", new)):
            body = webhook(call_id)
            status, _ = await post(ingest.url, body, headers=signed_headers(secret, body))
            assert status == 202
    rotated = WebhookVerifier.from_secrets((new,))
    async with running_ingest(tmp_path / "after", rotated) as ingest:
        await assert_refused(ingest, webhook("rot-late"), signed_headers(old, webhook("rot-late")),
                             "no signature matches")


def test_no_secret_without_the_explicit_opt_out_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="WEBHOOK_ALLOW_UNSIGNED=1"):
        WebhookVerifier.from_secrets(())


def test_secret_not_written_whsec_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="whsec_"):
        WebhookVerifier.from_secrets(("hunter2",))


async def test_explicitly_unsigned_ingest_accepts_unsigned_webhooks(tmp_path: Path) -> None:
    async with running_ingest(tmp_path, WebhookVerifier.from_secrets((), allow_unsigned=True)) as ingest:
        status, _ = await post(ingest.url, webhook("open-1"), headers={})
        assert status == 202


def run_ingest_briefly(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOK_")}
    full = {**clean, "INGEST_PORT": "0", "CALLMESH_DATA_DIR": str(tmp_path), "TRANSCRIBE_ADDR": "127.0.0.1:9", **env}
    try:
        return subprocess.run([sys.executable, "-m", "services.ingest"], env=full, cwd=ROOT, capture_output=True,
                              text=True, timeout=4)
    except subprocess.TimeoutExpired as exc:  # still serving: what we wanted to see has been logged
        out = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return subprocess.CompletedProcess(exc.cmd, -1, "", out)


def test_ingest_refuses_to_start_without_a_secret(tmp_path: Path) -> None:
    result = run_ingest_briefly(tmp_path)
    assert result.returncode == 2
    assert "WEBHOOK_SECRETS is empty" in result.stderr


def test_ingest_started_unsigned_on_purpose_warns(tmp_path: Path) -> None:
    result = run_ingest_briefly(tmp_path, WEBHOOK_ALLOW_UNSIGNED="1")
    assert result.returncode == -1, result.stderr
    assert "WARNING" in result.stderr and "accepted without a signature" in result.stderr
