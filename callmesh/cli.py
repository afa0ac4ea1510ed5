"""``callmesh``: run the mesh locally, submit calls, follow them, and talk to Transcribe directly.

Exit codes (also in the README):
  0  done
  1  the call failed (the stage and the reason are printed)
  2  wrong usage (unknown option, missing argument)
  3  a service is not reachable (start it with ``callmesh up``)
  4  refused: not audio, a URL or webhook ingest will not take, no such call, a call that cannot be retried
  5  timed out while following a call
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sqlite3
import time
import urllib.parse
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, AsyncIterator

import aiohttp
import grpc
import typer
from aiohttp import web
from rich.console import Console
from rich.json import JSON
from rich.table import Table

from callcenter.v1 import transcribe_pb2, transcribe_pb2_grpc
from callmesh.mesh import GRPC_SERVICES, Mesh, MeshError, new_mesh
from callmesh.samples import SampleError, make_sample
from callmesh.standins import CrmReceiver, new_webhook_secret, post_webhook
from services.common.config import ConfigError, TlsSettings, data_dir, database_url
from services.common.grpc_server import client_channel
from services.common.healthcheck import serving
from services.common.lifecycle import install_stop_signals, start_site
from services.common.sqlite import backup as sqlite_backup
from services.crm.config import outbox_path
from services.ingest.config import job_store_path

OK, CALL_FAILED, USAGE, UNREACHABLE, REFUSED, TIMED_OUT = 0, 1, 2, 3, 4, 5
DEFAULT_PORTS = {"transcribe": 50051, "analyze": 50052, "crm": 50053, "ingest": 8080}
STAGES = ("received", "downloading", "transcribing", "analyzing", "delivering", "done")

app = typer.Typer(help="Callmesh: on-premise call analytics. Run `callmesh up`, then `callmesh submit call.wav`.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)


class Exit(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def fail(code: int, message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def print_json(data: Any) -> None:
    """JSON on stdout, coloured on a terminal, never wrapped: a long string stays on its line, so the output
    parses when piped."""
    console.print(JSON(json.dumps(data, ensure_ascii=False)), soft_wrap=True)


def run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except Exit as exc:
        raise fail(exc.code, str(exc)) from None


# -- where things are --------------------------------------------------------------------------

def mesh_file() -> Path:
    return data_dir() / "mesh.json"


def local_mesh() -> dict[str, str]:
    """The addresses ``callmesh up`` wrote, if it is running."""
    try:
        return json.loads(mesh_file().read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def ingest_url(option: str | None) -> str:
    return (option or os.environ.get("CALLMESH_URL") or local_mesh().get("ingest_url")
            or f"http://127.0.0.1:{DEFAULT_PORTS['ingest']}").rstrip("/")


def webhook_secret(create: bool = False) -> str | None:
    """The first of WEBHOOK_SECRETS, else the local secret ``callmesh up`` keeps in the data directory."""
    configured = [s.strip() for s in os.environ.get("WEBHOOK_SECRETS", "").split(",") if s.strip()]
    if configured:
        return configured[0]
    path = data_dir() / "webhook-secret"
    if path.exists():
        return path.read_text().strip()
    if not create:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new_webhook_secret() + "\n")
    path.chmod(0o600)
    return path.read_text().strip()


def api_headers() -> dict[str, str]:
    token = os.environ.get("API_TOKEN", "")
    return {"Authorization": f"Bearer {token}"} if token else {}


@asynccontextmanager
async def ingest_session(url: str) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers=api_headers(), timeout=aiohttp.ClientTimeout(total=30)) as session:
        try:
            yield session
        except aiohttp.ClientConnectionError as exc:
            raise Exit(UNREACHABLE, f"ingest is not reachable at {url} ({exc.__class__.__name__}); "
                                    "start the mesh with `callmesh up` or pass --url") from None


UNAVAILABLE_FOR_NOW = {502, 503, 504}


async def get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    """The answer's status and JSON body; a body that is not JSON (a proxy's error page) as ``{"detail": …}``."""
    async with session.get(url) as resp:
        text = await resp.text()
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        return resp.status, body if isinstance(body, dict) else {"detail": text[:200] or f"HTTP {resp.status}"}


# -- callmesh up -------------------------------------------------------------------------------

@app.command()
def up(
    crm_url: Annotated[str | None, typer.Option(help="Where records go; default: a local CRM stand-in that "
                                                     "writes them to DATA/crm-received/")] = None,
) -> None:
    """Start the four services on this machine (embedded LLM, SQLite) until Ctrl-C."""
    run(_up(crm_url))


@dataclass
class LocalMesh:
    """The four services started here, and the CRM stand-in when no CRM was named."""

    mesh: Mesh
    crm_url: str
    receiver: CrmReceiver | None

    async def health_table(self) -> Table:
        table = Table("service", "address", "health", box=None)
        for name, _, _ in GRPC_SERVICES:
            address = self.mesh.services[name].address
            ok, said = await asyncio.to_thread(serving, address)
            table.add_row(name, address, f"[green]{said}[/]" if ok else f"[red]{said}[/]")
        async with aiohttp.ClientSession() as session:
            status, _ = await get_json(session, f"{self.mesh.ingest_url}/healthz")
        table.add_row("ingest", self.mesh.ingest_url, "[green]SERVING[/]" if status == 200 else f"[red]HTTP {status}[/]")
        table.add_row("crm target", self.crm_url, "stand-in (records saved to the data directory)" if self.receiver else "")
        return table

    async def stop(self) -> None:
        await asyncio.to_thread(self.mesh.stop)
        if self.receiver:
            await self.receiver.stop()


async def start_local_mesh(crm_url: str | None, ports: dict[str, int], logs: Path,
                           extra_env: dict[str, str] | None = None) -> LocalMesh:
    """Start the services as local processes with the embedded defaults (what `up` and `demo` share)."""
    root = data_dir()
    root.mkdir(parents=True, exist_ok=True)
    receiver: CrmReceiver | None = None
    if not crm_url:
        receiver = await CrmReceiver(save_dir=root / "crm-received").start()
        crm_url = receiver.url
    env = {
        "CRM_URL": crm_url, "WEBHOOK_SECRETS": os.environ.get("WEBHOOK_SECRETS") or webhook_secret(create=True) or "",
        # Local mode: recordings come from this machine (callmesh submit serves files on loopback).
        "RECORDING_ALLOWED_HOSTS": os.environ.get("RECORDING_ALLOWED_HOSTS", "127.0.0.1,localhost"),
        "RECORDING_ALLOWED_NETWORKS": os.environ.get("RECORDING_ALLOWED_NETWORKS", "127.0.0.0/8"),
    }
    for name, listen, _ in GRPC_SERVICES:
        env[listen] = os.environ.get(listen, f"127.0.0.1:{ports[name]}")
    env["INGEST_PORT"] = os.environ.get("INGEST_PORT", str(ports["ingest"]))
    logs.mkdir(parents=True, exist_ok=True)
    mesh: Mesh = new_mesh({**env, **(extra_env or {})}, logs)
    console.print(f"Starting the mesh (logs in {logs}) …")
    try:
        await asyncio.to_thread(mesh.start)
    except MeshError as exc:
        await asyncio.to_thread(mesh.stop)
        if receiver:
            await receiver.stop()
        raise Exit(UNREACHABLE, str(exc)) from None
    return LocalMesh(mesh, crm_url, receiver)


async def _up(crm_url: str | None) -> None:
    local = await start_local_mesh(crm_url, DEFAULT_PORTS, data_dir() / "logs")
    mesh = local.mesh
    console.print(await local.health_table())
    mesh_file().write_text(json.dumps({"ingest_url": mesh.ingest_url, "pid": os.getpid(), **{
        name: mesh.services[name].address for name, _, _ in GRPC_SERVICES}}))
    stop = asyncio.Event()
    install_stop_signals(stop)
    console.print(f"Web page: {mesh.ingest_url}/   ·   Ctrl-C stops the mesh gracefully", style="bold")
    await stop.wait()
    console.print("Stopping: each service drains its work …")
    mesh_file().unlink(missing_ok=True)
    await local.stop()
    console.print("Stopped.")


# -- callmesh demo -----------------------------------------------------------------------------

@app.command()
def demo(
    audio: Annotated[Path | None, typer.Option(help="A recording instead of the generated Spanish sample",
                                               exists=True, dir_okay=False)] = None,
    stereo: Annotated[str | None, typer.Option(help="Stereo recording: agent=left or agent=right")] = None,
    language: Annotated[str | None, typer.Option(help="Language hint, e.g. es")] = None,
    call_id: Annotated[str | None, typer.Option(help="Default: generated")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the CRM record (or the failed status) as JSON")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to follow the call")] = 900.0,
) -> None:
    """Start a private mesh on free ports, run one call through it, print the CRM record, stop."""
    agent = parse_stereo(stereo)
    raise typer.Exit(run(_demo(audio, agent, language, call_id, out, timeout)))


async def _demo(audio: Path | None, agent: str | None, language: str | None, call_id: str | None,
                out: Path | None, timeout: float) -> int:
    work = data_dir() / "demo"
    if audio is None:
        try:
            sample, audio = make_sample("es-billing-angry", work / "recordings")
        except SampleError as exc:
            raise Exit(CALL_FAILED, str(exc)) from None
        console.print(f"Recording: a Spanish sample call generated with espeak-ng:\n  \"{sample.text}\"")
    # Its own stores and worker id: a demo never touches the calls of a mesh started with `up`.
    local = await start_local_mesh(None, {name: 0 for name in DEFAULT_PORTS}, work / "logs", {
        "INGEST_DATABASE": str(work / "ingest.db"), "CRM_DATABASE": str(work / "crm-outbox.db"),
        "RECORDING_DIR": str(work / "recordings-downloaded"), "INGEST_WORKER_ID": f"demo-{os.getpid()}"})
    try:
        console.print(await local.health_table())
        return await _submit(str(audio), call_id or f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}",
                             language, agent, local.mesh.ingest_url, timeout, out)
    finally:
        await local.stop()


# -- callmesh submit ---------------------------------------------------------------------------

def parse_metadata(values: list[str] | None) -> dict[str, str]:
    """``--meta KEY=VALUE`` options as the webhook's ``metadata`` (ingest checks the names and sizes)."""
    metadata: dict[str, str] = {}
    for value in values or ():
        key, equals, text = value.partition("=")
        if not key or not equals:
            raise typer.BadParameter(f"{value!r}: use --meta KEY=VALUE, e.g. --meta agent_id=A-117")
        metadata[key] = text
    return metadata


def parse_stereo(value: str | None) -> str | None:
    if value is None:
        return None
    key, _, side = value.partition("=")
    if key != "agent" or side not in ("left", "right"):
        raise typer.BadParameter("use --stereo agent=left or --stereo agent=right")
    return side


@asynccontextmanager
async def served_file(path: Path) -> AsyncIterator[str]:
    """Serve one local file on 127.0.0.1 under an unguessable path while the call is processed."""
    token = secrets.token_urlsafe(16)

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.match_info["token"] != token:
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    application = web.Application()
    application.router.add_get("/recordings/{token}/{name}", handler)
    runner, port = await start_site(application, "127.0.0.1", 0, access_log=None)
    try:
        yield f"http://127.0.0.1:{port}/recordings/{token}/{path.name}"
    finally:
        await runner.cleanup()


@app.command()
def submit(
    source: Annotated[str, typer.Argument(help="A local recording (served to the mesh on loopback) or its URL")],
    call_id: Annotated[str | None, typer.Option(help="Default: generated")] = None,
    language: Annotated[str | None, typer.Option(help="Language hint, e.g. es")] = None,
    stereo: Annotated[str | None, typer.Option(help="Stereo recording: agent=left or agent=right")] = None,
    url: Annotated[str | None, typer.Option(help="Ingest URL (default: the local mesh)")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to follow the call")] = 1800.0,
    out: Annotated[Path | None, typer.Option(help="Write the final record (or status) as JSON")] = None,
    meta: Annotated[list[str] | None, typer.Option(
        "--meta", help="A field for the CRM record's metadata, KEY=VALUE (repeatable), as a recorder sends")] = None,
) -> None:
    """Send a call through the mesh, follow it stage by stage and print the CRM record."""
    agent = parse_stereo(stereo)
    metadata = parse_metadata(meta)
    code = run(_submit(source, call_id, language, agent, ingest_url(url), timeout, out, metadata))
    raise typer.Exit(code)


async def _submit(source: str, call_id: str | None, language: str | None, agent: str | None, base: str,
                  timeout: float, out: Path | None, metadata: dict[str, str] | None = None) -> int:
    call_id = call_id or f"cli-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    payload: dict[str, Any] = {"call_id": call_id}
    if language:
        payload["language"] = language
    if agent:
        payload["agent_channel"] = agent
    if metadata:
        payload["metadata"] = metadata
    local = Path(source)
    if "://" not in source and not local.is_file():
        if not local.exists():
            raise Exit(REFUSED, f"{source}: no such file (and not a URL)")
        raise Exit(REFUSED, f"{source} is neither a file nor a URL")
    async with ingest_session(base) as session:
        if "://" in source:
            return await _post_and_follow(session, base, {**payload, "recording_url": source}, timeout, out)
        async with served_file(local.resolve()) as recording_url:
            return await _post_and_follow(session, base, {**payload, "recording_url": recording_url}, timeout, out)


async def _post_and_follow(session: aiohttp.ClientSession, base: str, payload: dict[str, Any], timeout: float,
                           out: Path | None) -> int:
    code, ack = await post_webhook(session, base, payload, webhook_secret())
    if code != 202:
        hint = " (is WEBHOOK_SECRETS the same as ingest's?)" if code == 401 else ""
        raise Exit(REFUSED, f"ingest refused the call: HTTP {code}: {ack.get('detail', ack)}{hint}")
    console.print(f"Call [bold]{payload['call_id']}[/] accepted · trace {ack['trace_id']}")
    status = await follow(session, ack["status_url"], timeout)
    jaeger = os.environ.get("JAEGER_UI_URL", "").rstrip("/")
    trace_line = f"Trace id: {status['trace_id']}" + (f"  ({jaeger}/trace/{status['trace_id']})" if jaeger else "")
    if status["status"] == "done":
        record = status.get("result") or {}
        console.print("CRM record:")
        print_json(record)
        console.print(trace_line)
        if out:
            out.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        return OK
    if out:
        out.write_text(json.dumps(status, indent=2, ensure_ascii=False) + "\n")
    error = status.get("error") or {}
    err.print(f"[bold red]The call failed at {error.get('stage')}:[/] {error.get('message')}")
    console.print(trace_line)
    return CALL_FAILED


async def follow(session: aiohttp.ClientSession, status_url: str, timeout: float) -> dict[str, Any]:
    """Poll the status API, printing each stage as the call enters it, until done or failed."""
    start = time.monotonic()
    shown: set[str] = set()
    status: dict[str, Any] = {}
    with console.status("waiting …") as spinner:
        while time.monotonic() - start < timeout:
            code, answer = await get_json(session, status_url)
            if code in UNAVAILABLE_FOR_NOW:  # its job store (or a proxy before it) for a moment: the call goes on
                spinner.update(f"{status.get('status', 'waiting')} · the status API answered HTTP {code} "
                               f"({answer.get('detail', 'unavailable')}); still following")
                await asyncio.sleep(1.0)
                continue
            if code != 200:
                raise Exit(REFUSED, f"status API answered HTTP {code}: {answer.get('detail', answer)}")
            status = answer
            for stage, _ in status["stages"].items():
                if stage not in shown:
                    shown.add(stage)
                    console.print(f"  [{time.monotonic() - start:6.1f} s] {stage}")
            if status["status"] in ("done", "failed"):
                return status
            progress = status.get("progress") or {}
            detail = f" · {progress['segments']} segments" if progress.get("segments") else ""
            if status["status"] == "transcribing" and (so_far := transcribed_so_far(progress)):
                detail += f" · {so_far}"
            retry = f" · retrying: {status['error']['message']}" if status.get("error") else ""
            spinner.update(f"{status['status']}{detail}{retry}")
            await asyncio.sleep(0.5)
    raise Exit(TIMED_OUT, f"the call was still {status.get('status')} after {timeout:.0f} s; "
                          f"follow it with `callmesh status {status.get('call_id', '')}`")


# -- callmesh status / calls / retry -----------------------------------------------------------

@app.command()
def status(
    call_id: Annotated[str | None, typer.Argument(help="One call; without it: counts and recent calls")] = None,
    url: Annotated[str | None, typer.Option(help="Ingest URL (default: the local mesh)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status API's JSON")] = False,
) -> None:
    """Where a call is (or how all calls stand)."""
    run(_status(call_id, ingest_url(url), as_json))


async def read_api(base: str, path: str, as_json: bool) -> dict[str, Any] | None:
    """GET an ingest API path; print it as JSON and return None with ``as_json``; exit 4 on an error answer."""
    async with ingest_session(base) as session:
        code, body = await get_json(session, base + path)
    if code != 200:
        raise Exit(REFUSED, body.get("detail", f"HTTP {code}"))
    if as_json:
        print_json(body)
        return None
    return body


def crm_progress(call: dict[str, Any]) -> str | None:
    """A call waiting for the CRM: its delivery's attempts and last error (a record the CRM keeps failing on
    shows here, and holds up the calls behind it: see `callmesh set-aside`)."""
    delivery = call.get("delivery") or {}
    if call.get("status") != "delivering" or not delivery.get("attempts"):
        return None
    line = f"{delivery['state']}, {delivery['attempts']} attempt(s)"
    return f"{line}; last: {delivery['last_error']}" if delivery.get("last_error") else line


async def _status(call_id: str | None, base: str, as_json: bool) -> None:
    if call_id is None:
        await _calls({"limit": "20"}, base, as_json)
        return
    body = await read_api(base, f"/v1/calls/{call_id}", as_json)
    if body is None:
        return
    table = Table(box=None, show_header=False)
    table.add_row("call", body["call_id"])
    table.add_row("status", body["status"])
    for stage, when in body["stages"].items():
        table.add_row(f"  {stage}", when or "")
    if body.get("error"):
        table.add_row("error", f"{body['error']['stage']}: {body['error']['message']}")
    progress = body.get("progress") or {}
    if not progress.get("transcript_complete") and (so_far := transcribed_so_far(progress)):
        n = progress.get("segments", 0)
        table.add_row("transcribed", f"{so_far} ({n} segment{'' if n == 1 else 's'})")
    if crm := crm_progress(body):
        table.add_row("CRM", crm)
    if "recording_kept" in body:
        table.add_row("recording", "kept for a retry" if body["recording_kept"] else "deleted: a retry downloads it again")
    result = body.get("result") or {}
    for key in ("language", "topic", "sentiment", "emotion"):
        if result.get(key):
            table.add_row(key, str(result[key]))
    for line in result.get("summary", []):
        table.add_row("summary", line)
    table.add_row("trace", body["trace_id"])
    console.print(table)


@app.command()
def calls(
    status_filter: Annotated[str | None, typer.Option("--status", help="Only calls in this state, e.g. failed")] = None,
    meta: Annotated[str | None, typer.Option(
        "--meta", help="Only calls whose webhook metadata had this value, KEY=VALUE (e.g. a customer's number)")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first")] = 50,
    url: Annotated[str | None, typer.Option(help="Ingest URL (default: the local mesh)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status API's JSON")] = False,
) -> None:
    """List calls, newest first."""
    query = {"limit": str(limit), **({"status": status_filter} if status_filter else {}),
             **({"metadata": meta_query(meta)} if meta is not None else {})}
    run(_calls(query, ingest_url(url), as_json))


def meta_query(value: str) -> str:
    """``--meta KEY=VALUE`` as the status API's ``metadata`` filter."""
    key, equals, _ = value.partition("=")
    if not key or not equals:
        raise fail(USAGE, f"{value!r}: use --meta KEY=VALUE, e.g. --meta customer_number=+34600123456")
    return value


async def _calls(query: dict[str, str], base: str, as_json: bool) -> None:
    body = await read_api(base, f"/v1/calls?{urllib.parse.urlencode(query)}", as_json)
    if body is None:
        return
    console.print("  ".join(f"{k}: {v}" for k, v in sorted(body["counts"].items())) or "no calls yet")
    table = Table("call", "status", "language", "topic", "sentiment", "error")
    for c in body["calls"]:
        result = c.get("result") or {}
        error = c.get("error") or {}
        table.add_row(c["call_id"], c["status"], result.get("language") or c["progress"].get("language") or "",
                      result.get("topic", ""), result.get("sentiment", ""),
                      f"{error.get('stage')}: {error.get('message')}" if error else crm_progress(c) or "")
    console.print(table)


RETRY_PAGE = 500  # the status API's largest page
FAILED_AT = ("downloading", "transcribing", "analyzing", "delivering", "any")


@app.command()
def retry(
    call_id: Annotated[str | None, typer.Argument(help="A failed call")] = None,
    failed_at: Annotated[str | None, typer.Option(
        "--failed-at", help=f"Instead of one call: every call that failed at this stage ({', '.join(FAILED_AT)})")] = None,
    url: Annotated[str | None, typer.Option(help="Ingest URL (default: the local mesh)")] = None,
) -> None:
    """Replay a failed call from the stage it failed in (or every call that failed at a stage)."""
    if (call_id is None) == (failed_at is None):
        raise fail(USAGE, "name one failed call, or --failed-at STAGE for all that failed there")
    if failed_at is not None and failed_at not in FAILED_AT:
        raise fail(USAGE, f"--failed-at must be one of {', '.join(FAILED_AT)}")
    run(_retry(call_id, ingest_url(url)) if call_id is not None else _retry_failed(failed_at or "any", ingest_url(url)))


async def post_retry(session: aiohttp.ClientSession, base: str, call_id: str) -> tuple[bool, dict[str, Any]]:
    """Ask ingest to replay ``call_id``: (whether it took it, its answer)."""
    async with session.post(f"{base}/v1/calls/{call_id}:retry") as resp:
        return resp.status == 202, await resp.json(content_type=None)


async def _retry(call_id: str, base: str) -> None:
    async with ingest_session(base) as session:
        taken, body = await post_retry(session, base, call_id)
    if not taken:
        raise Exit(REFUSED, body.get("detail", "refused"))
    console.print(f"Call {call_id} queued again at {body['status']}")


async def calls_in(session: aiohttp.ClientSession, base: str, **query: str) -> list[dict[str, Any]]:
    """Every call the status API lists for ``query`` (status=failed, metadata=KEY=VALUE), page by page (once each:
    a call that moved while the pages were read can appear twice)."""
    calls: dict[str, dict[str, Any]] = {}
    offset = 0
    while True:
        page = urllib.parse.urlencode({**query, "limit": RETRY_PAGE, "offset": offset})
        code, body = await get_json(session, f"{base}/v1/calls?{page}")
        if code != 200:
            raise Exit(REFUSED, body.get("detail", f"HTTP {code}"))
        calls.update((c["call_id"], c) for c in body["calls"] if c["call_id"] not in calls)
        if len(body["calls"]) < RETRY_PAGE:
            return list(calls.values())
        offset += RETRY_PAGE


async def each_call(session: aiohttp.ClientSession, method: str, base: str, call_ids: list[str], action: str,
                    expected: int) -> dict[str, str]:
    """``method`` on ``/v1/calls/{call_id}{action}`` for each call in turn: those refused, with ingest's reason."""
    refused: dict[str, str] = {}
    for call_id in call_ids:
        async with session.request(method, f"{base}/v1/calls/{call_id}{action}") as resp:
            if resp.status != expected:
                body = await resp.json(content_type=None)
                refused[call_id] = body.get("detail", f"HTTP {resp.status}")
    return refused


async def _retry_failed(stage: str, base: str) -> None:
    """Every failed call (at ``stage``, or "any"): listed first, page by page, then each retried."""
    async with ingest_session(base) as session:
        chosen = [c["call_id"] for c in await calls_in(session, base, status="failed")
                  if stage == "any" or (c.get("error") or {}).get("stage") == stage]
        skipped = []
        for call_id in chosen:
            taken, answer = await post_retry(session, base, call_id)
            if not taken:  # retried meanwhile by someone else: no longer failed
                skipped.append(f"{call_id} ({answer.get('detail', 'refused')})")
    where = "" if stage == "any" else f" at {stage}"
    console.print(f"{len(chosen) - len(skipped)} call(s) that failed{where} queued again")
    for line in skipped:
        console.print(f"  not retried: {line}")


@app.command()
def reanalyze(
    call_ids: Annotated[list[str] | None, typer.Argument(help="Done calls")] = None,
    all_done: Annotated[bool, typer.Option("--all-done", help="Instead: every done call still kept")] = False,
    url: Annotated[str | None, typer.Option(help="Ingest URL (default: the local mesh)")] = None,
) -> None:
    """Analyse done calls again, after a change of taxonomy (ANALYZE_TOPICS), prompt or model, and send the CRM
    each new record: revision one more than the record it has, under an Idempotency-Key of its own."""
    if bool(call_ids) == all_done:
        raise fail(USAGE, "name done calls, or --all-done for every done call still kept")
    run(_reanalyze(call_ids or [], all_done, ingest_url(url)))


async def _reanalyze(call_ids: list[str], all_done: bool, base: str) -> None:
    async with ingest_session(base) as session:
        if all_done:
            call_ids = [c["call_id"] for c in await calls_in(session, base, status="done")]
        refused = await each_call(session, "POST", base, call_ids, ":reanalyze", 202)
    console.print(f"{len(call_ids) - len(refused)} call(s) back at analyzing; each reaches the CRM as a new revision")
    for call_id, reason in refused.items():
        console.print(f"  not analysed again: {call_id} ({reason})")
    if refused and not all_done:
        raise Exit(REFUSED, f"{len(refused)} call(s) could not be analysed again")


@app.command("set-aside")
def set_aside(
    call_id: Annotated[str, typer.Argument(help="A call waiting for the CRM (delivering)")],
    reason: Annotated[str, typer.Option("--reason", help="Why, kept as the call's error (e.g. a ticket number)")],
    url: Annotated[str | None, typer.Option(help="Ingest URL (default: the local mesh)")] = None,
) -> None:
    """Take a call's record out of the CRM queue, for a record the CRM fails on while it takes the others
    (records reach the CRM in order, so it holds up every call behind it). The call fails at delivery with
    the reason; `callmesh retry CALL_ID` sends it again once the CRM side is fixed."""
    run(_set_aside(call_id, reason, ingest_url(url)))


async def _set_aside(call_id: str, reason: str, base: str) -> None:
    async with ingest_session(base) as session:
        async with session.post(f"{base}/v1/calls/{call_id}:setAside", json={"reason": reason}) as resp:
            body = await resp.json(content_type=None)
            if resp.status != 202:
                raise Exit(USAGE if resp.status == 422 else REFUSED, body.get("detail", f"HTTP {resp.status}"))
    console.print(f"Call {call_id}: its record is set aside; the records behind it go to the CRM. "
                  f"`callmesh retry {call_id}` sends it again.")


@app.command()
def erase(
    call_id: Annotated[str | None, typer.Argument(help="A done or failed call")] = None,
    meta: Annotated[str | None, typer.Option(
        "--meta", help="Instead: every call whose webhook metadata had this value, KEY=VALUE (a caller's number)")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask first")] = False,
    url: Annotated[str | None, typer.Option(help="Ingest URL (default: the local mesh)")] = None,
) -> None:
    """Erase finished calls, for a caller who asks that their data be erased: the transcript, analysis and
    record here and in the CRM outbox, and a failed call's recording. The CRM's own copy is not touched.
    A caller is known by a number, not by call ids: --meta finds their calls by the recorder's metadata."""
    if (call_id is None) == (meta is None):
        raise fail(USAGE, "name one call, or --meta KEY=VALUE for every call of a caller")
    run(_erase([call_id] if call_id is not None else None, meta_query(meta) if meta else "", yes, ingest_url(url)))


async def _erase(call_ids: list[str] | None, meta: str, yes: bool, base: str) -> None:
    async with ingest_session(base) as session:
        if call_ids is None:
            call_ids = [c["call_id"] for c in await calls_in(session, base, metadata=meta)]
            if not call_ids:
                console.print(f"No call has {meta} in its metadata: nothing to erase")
                return
        what = f"call {call_ids[0]}" if len(call_ids) == 1 else f"{len(call_ids)} calls ({', '.join(call_ids)})"
        if not yes and not typer.confirm(f"Erase {what} and everything Callmesh keeps of them?"):
            raise Exit(USAGE, "nothing erased")
        refused = await each_call(session, "DELETE", base, call_ids, "", 204)
    for call_id in call_ids:
        if call_id not in refused:
            console.print(f"Call {call_id} is erased from Callmesh (the CRM keeps its own copy)")
    if refused:
        raise Exit(REFUSED, "not erased: " + "; ".join(f"{call_id}: {reason}" for call_id, reason in refused.items()))


# -- callmesh backup ---------------------------------------------------------------------------

@app.command()
def backup(
    destination: Annotated[Path, typer.Argument(help="A folder for the copies (made if missing)")],
) -> None:
    """Copy the job store and the CRM outbox of a one-machine install (SQLite) while the services run: each copy
    is one consistent state, checked before it is kept. Recordings are not copied (a restored call whose recording
    is gone downloads it again). With DATABASE_URL set, back up PostgreSQL with pg_dump instead."""
    try:
        if database_url():
            raise fail(USAGE, "DATABASE_URL is set: the job store and the outbox are in PostgreSQL; back them up "
                       "with pg_dump (e.g. pg_dump --format=custom \"$DATABASE_URL\" > callmesh.dump)")
        stores = {"job store": job_store_path(), "CRM outbox": outbox_path()}
    except ConfigError as exc:
        raise fail(USAGE, str(exc)) from None
    found = {what: path for what, path in stores.items() if path.is_file()}
    if not found:
        raise fail(USAGE, f"no job store or outbox here ({', '.join(str(p) for p in stores.values())}): set "
                   "CALLMESH_DATA_DIR (or INGEST_DATABASE, CRM_DATABASE) as the services have it")
    taken = [destination / path.name for path in found.values() if (destination / path.name).exists()]
    if taken:
        raise fail(USAGE, f"{', '.join(map(str, taken))} already there: back up into a new folder")
    destination.mkdir(parents=True, exist_ok=True)
    table = Table("what", "copied from", "to", "rows")
    for what, path in found.items():
        copy = destination / path.name
        try:
            sqlite_backup(path, copy)
        except sqlite3.Error as exc:
            raise fail(CALL_FAILED, f"the {what} ({path}) could not be copied: {exc}") from None
        table.add_row(what, str(path), str(copy), _row_counts(copy))
    console.print(table)
    console.print("To restore: stop the services, put the copies in place of the files (and delete any -wal and "
                  "-shm files beside them), then start the services.")


def _row_counts(path: Path) -> str:
    with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return ", ".join(f"{db.execute(f'SELECT COUNT(*) FROM {t}').fetchone()[0]} {t}" for t in tables)


# -- callmesh transcribe -----------------------------------------------------------------------

@app.command()
def transcribe(
    file: Annotated[Path, typer.Argument(help="A recording", exists=True, dir_okay=False, readable=True)],
    language: Annotated[str | None, typer.Option(help="Language hint, e.g. es")] = None,
    stereo: Annotated[str | None, typer.Option(help="Stereo recording: agent=left or agent=right")] = None,
    addr: Annotated[str | None, typer.Option(help="Transcribe address (default: the local mesh)")] = None,
) -> None:
    """Call the Transcribe RPC directly and print segments as they are decoded."""
    address = addr or os.environ.get("TRANSCRIBE_ADDR") or local_mesh().get("transcribe") or "127.0.0.1:50051"
    run(_transcribe(file, language, parse_stereo(stereo), address))


async def _transcribe(file: Path, language: str | None, agent: str | None, address: str) -> None:
    config = transcribe_pb2.TranscriptionConfig(
        call_id=f"cli-{secrets.token_hex(3)}", language_code=language or "",
        channel_layout=transcribe_pb2.CHANNEL_LAYOUT_STEREO if agent else transcribe_pb2.CHANNEL_LAYOUT_MONO,
        agent_channel=transcribe_pb2.AGENT_CHANNEL_RIGHT if agent == "right" else transcribe_pb2.AGENT_CHANNEL_LEFT)

    async def requests() -> AsyncIterator[transcribe_pb2.TranscribeRequest]:
        yield transcribe_pb2.TranscribeRequest(config=config)
        with file.open("rb") as f:
            while chunk := f.read(256 * 1024):
                yield transcribe_pb2.TranscribeRequest(audio=chunk)

    async with client_channel(address, TlsSettings.from_env()) as channel:
        stub = transcribe_pb2_grpc.TranscriptionServiceStub(channel)
        try:
            async for reply in stub.Transcribe(requests(), timeout=3600):
                kind = reply.WhichOneof("response")
                if kind == "language":
                    console.print(f"[bold]language[/] {reply.language.language_code} "
                                  f"(p={reply.language.probability:.2f})" if reply.language.language_code else
                                  "[bold]language[/] none: no speech in the recording")
                elif kind == "segment":
                    s = reply.segment
                    who = {1: "agent", 2: "customer"}.get(s.speaker, "")
                    start = s.start_offset.seconds + s.start_offset.nanos / 1e9
                    end = s.end_offset.seconds + s.end_offset.nanos / 1e9
                    console.print(f"[dim][{_clock(start)} → {_clock(end)}][/] "
                                  f"{f'[bold]{who}:[/] ' if who else ''}{s.text.strip()}")
                elif kind == "summary":
                    d = reply.summary.audio_duration
                    console.print(f"[dim]{d.seconds + d.nanos / 1e9:.1f} s of audio · model {reply.summary.model}[/]")
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise Exit(UNREACHABLE, f"transcribe is not reachable at {address}: {exc.details()}") from None
            if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
                raise Exit(REFUSED, f"{file}: {exc.details()}") from None
            raise Exit(CALL_FAILED, f"{exc.code().name}: {exc.details()}") from None


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60):02d}:{seconds % 60:04.1f}"


def transcribed_so_far(progress: dict[str, Any]) -> str | None:
    """"01:15.2 of 10:00.0" from a status's progress, once the recording's length is known."""
    if not progress.get("audio_seconds"):
        return None
    return f"{_clock(progress.get('transcribed_seconds') or 0.0)} of {_clock(progress['audio_seconds'])}"


def main() -> None:
    app()


if __name__ == "__main__":
    main()
