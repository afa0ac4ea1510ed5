"""A recorder that misbehaves on purpose, on loopback: what an attacker or a broken recorder serves."""

from __future__ import annotations

import asyncio

from aiohttp import web

from services.common.lifecycle import start_site

WAV_HEAD = b"RIFF\x24\x08\x00\x00WAVEfmt \x10\x00\x00\x00"


class HostileRecorder:
    """``/trickle`` one byte a second; ``/hops/{n}`` n redirects then audio; ``/to/{target}`` a redirect
    to an address of our choosing; ``/big`` more bytes than the cap, with no Content-Length;
    ``/html``; ``/empty``; ``/error/{status}``."""

    def __init__(self, big_bytes: int) -> None:
        self.big_bytes = big_bytes
        self.url = ""
        self.hits: dict[str, int] = {}
        self._runner: web.AppRunner | None = None

    def _hit(self, request: web.Request) -> None:
        key = request.path.split("/")[1]
        self.hits[key] = self.hits.get(key, 0) + 1

    async def trickle(self, request: web.Request) -> web.StreamResponse:
        self._hit(request)
        resp = web.StreamResponse(headers={"Content-Type": "audio/wav"})
        await resp.prepare(request)
        try:
            for byte in WAV_HEAD * 10:
                await resp.write(bytes([byte]))
                await asyncio.sleep(1.0)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return resp

    async def hops(self, request: web.Request) -> web.Response:
        self._hit(request)
        n = int(request.match_info["n"])
        if n > 0:
            raise web.HTTPFound(f"/hops/{n - 1}")
        return web.Response(body=WAV_HEAD + bytes(4000), content_type="audio/wav")

    async def to(self, request: web.Request) -> web.Response:
        self._hit(request)
        raise web.HTTPFound(f"http://{request.match_info['target']}/recording.wav")

    async def big(self, request: web.Request) -> web.StreamResponse:
        self._hit(request)
        resp = web.StreamResponse(headers={"Content-Type": "audio/wav"})  # chunked: the size is not announced
        await resp.prepare(request)
        await resp.write(WAV_HEAD)
        sent, block = len(WAV_HEAD), bytes(64 * 1024)
        try:
            while sent <= self.big_bytes:
                await resp.write(block)
                sent += len(block)
        except ConnectionResetError:
            pass
        return resp

    async def html(self, request: web.Request) -> web.Response:
        self._hit(request)
        return web.Response(text="<!doctype html><html><body>Login</body></html>" * 5, content_type="text/html")

    async def empty(self, request: web.Request) -> web.Response:
        self._hit(request)
        return web.Response(body=b"", content_type="audio/wav")

    async def error(self, request: web.Request) -> web.Response:
        self._hit(request)
        return web.Response(status=int(request.match_info["status"]), text="no")

    async def start(self) -> "HostileRecorder":
        app = web.Application()
        app.router.add_get("/trickle", self.trickle)
        app.router.add_get("/hops/{n}", self.hops)
        app.router.add_get("/to/{target}", self.to)
        app.router.add_get("/big", self.big)
        app.router.add_get("/html", self.html)
        app.router.add_get("/empty", self.empty)
        app.router.add_get("/error/{status}", self.error)
        self._runner, port = await start_site(app, "127.0.0.1", 0, access_log=None)
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
