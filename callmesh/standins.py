"""Stand-ins for the systems around the product: the call recorder and the CRM.

Both speak plain HTTP on loopback, as the real ones do: the recorder serves
recordings from a folder and signs its webhooks the Standard Webhooks way; the
CRM receiver takes JSON records, remembers each POST and its Idempotency-Key,
and can be told to be down or to answer errors.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import ssl
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from services.common.lifecycle import start_site
from services.common.webhooks import signature_headers

log = logging.getLogger(__name__)


def new_webhook_secret() -> str:
    """A fresh ``whsec_`` secret (24 random bytes), the form WEBHOOK_SECRETS takes."""
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def signed_headers(secret: str, body: bytes, *, webhook_id: str | None = None,
                   timestamp: float | None = None) -> dict[str, str]:
    """The Standard Webhooks headers a recorder sends with ``body``."""
    return {"Content-Type": "application/json",
            **signature_headers(Webhook(secret), webhook_id or f"msg_{uuid.uuid4().hex}", body,
                                time.time() if timestamp is None else timestamp)}


async def post_webhook(session: aiohttp.ClientSession, ingest_url: str, payload: dict[str, Any],
                       secret: str | None) -> tuple[int, dict[str, Any]]:
    """POST one call-ended webhook, signed when ``secret`` is given; returns (HTTP status, JSON body)."""
    body = json.dumps(payload).encode()
    headers = signed_headers(secret, body) if secret else {"Content-Type": "application/json"}
    async with session.post(f"{ingest_url}/v1/calls", data=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


class Recorder:
    """Serves files from ``directory`` at ``/recordings/<name>``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.requests: list[str] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.requests.append(name)
        path = (self.directory / name).resolve()
        if path.parent != self.directory.resolve() or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    async def start(self, host: str = "127.0.0.1", port: int = 0,
                    ssl_context: ssl.SSLContext | None = None) -> "Recorder":
        """Serve on ``host:port`` (over https with ``ssl_context``)."""
        app = web.Application()
        app.router.add_get("/recordings/{name}", self._serve)
        self._runner, bound = await start_site(app, host, port, ssl_context=ssl_context, access_log=None)
        self.url = f"{'https' if ssl_context else 'http'}://{host}:{bound}"
        return self

    def url_for(self, name: str) -> str:
        return f"{self.url}/recordings/{name}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@dataclass
class ReceivedRecord:
    idempotency_key: str
    body: dict[str, Any]


@dataclass
class CrmReceiver:
    """A CRM endpoint: ``POST /records``. ``fail_with`` makes it answer that status instead; ``fail_for`` answers
    the given status to the records of the given calls only (a CRM that chokes on one record); ``hold`` keeps
    every answer until that event is set (a slow CRM)."""

    records: list[ReceivedRecord] = field(default_factory=list)
    posts: int = 0
    fail_with: int | None = None
    fail_for: dict[str, int] = field(default_factory=dict)
    hold: asyncio.Event | None = None  # set: every POST is answered only once this event is set
    required_headers: dict[str, str] = field(default_factory=dict)  # a POST without them all is answered 401
    signing_secret: str = ""  # set: a POST without a valid Standard Webhooks signature under it is answered 401
    url: str = ""
    _runner: web.AppRunner | None = None
    _arrived: asyncio.Condition | None = None
    print_records: bool = False
    save_dir: Path | None = None  # set: each record is also written to <save_dir>/<call_id>.json

    async def _post(self, request: web.Request) -> web.Response:
        self.posts += 1
        if self.hold is not None:
            await self.hold.wait()
        if self.fail_with is not None:
            return web.json_response({"error": "unavailable"}, status=self.fail_with)
        if any(request.headers.get(name) != value for name, value in self.required_headers.items()):
            return web.json_response({"error": "not authorized"}, status=401)
        raw = await request.read()
        if self.signing_secret:
            try:
                Webhook(self.signing_secret).verify(raw, dict(request.headers), json_parse=False)
            except WebhookVerificationError as exc:
                return web.json_response({"error": f"signature: {exc}"}, status=401)
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            return web.json_response({"error": "not JSON"}, status=400)
        if (status := self.fail_for.get(str(body.get("call_id")))) is not None:
            return web.json_response({"error": "could not store the record"}, status=status)
        key = request.headers.get("Idempotency-Key", "")
        if any(r.idempotency_key == key for r in self.records):
            return web.json_response({"status": "duplicate"}, status=200)
        self.records.append(ReceivedRecord(key, body))
        if self.save_dir is not None:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            name = "".join(c if c.isalnum() or c in "._-" else "_" for c in str(body.get("call_id", key)))
            (self.save_dir / f"{name}.json").write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n")
        if self.print_records:
            log.info("CRM received record for call %s", body.get("call_id"))
        assert self._arrived is not None
        async with self._arrived:
            self._arrived.notify_all()
        return web.json_response({"status": "created"}, status=201)

    async def start(self, host: str = "127.0.0.1", port: int = 0,
                    ssl_context: ssl.SSLContext | None = None) -> "CrmReceiver":
        """Serve on ``host:port`` (over https with ``ssl_context``)."""
        self._arrived = asyncio.Condition()
        app = web.Application()
        app.router.add_post("/records", self._post)
        self._runner, bound = await start_site(app, host, port, ssl_context=ssl_context, access_log=None)
        self.url = f"{'https' if ssl_context else 'http'}://{host}:{bound}/records"
        return self

    def for_call(self, call_id: str) -> list[ReceivedRecord]:
        return [r for r in self.records if r.body.get("call_id") == call_id]

    async def wait_for(self, call_id: str, timeout: float) -> ReceivedRecord:
        assert self._arrived is not None
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: bool(self.for_call(call_id))), timeout)
        return self.for_call(call_id)[0]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
