"""``callmesh-demo``: one call through the whole mesh on this machine.

Starts the four services, a stand-in recorder that serves the recording over
HTTP on loopback and a stand-in CRM that prints what it receives; posts the
recorder's webhook; follows the call stage by stage; prints the CRM record and
the call's trace id.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import aiohttp

from callmesh.mesh import Mesh, MeshError, new_mesh
from callmesh.samples import SampleError, make_sample
from callmesh.standins import CrmReceiver, Recorder, post_webhook
from services.common.config import data_dir

log = logging.getLogger("callmesh.demo")


async def follow(session: aiohttp.ClientSession, status_url: str, timeout: float) -> dict:
    """Poll the status API, printing each stage as the call enters it, until done or failed."""
    seen: set[str] = set()
    started = time.monotonic()
    last_segments = -1
    while True:
        async with session.get(status_url) as resp:
            status = await resp.json()
        for stage in status["stages"]:
            if stage not in seen:
                seen.add(stage)
                print(f"  [{time.monotonic() - started:6.1f} s] {stage}", flush=True)
        segments = status["progress"]["segments"]
        if status["status"] == "transcribing" and segments != last_segments and segments:
            print(f"           {segments} segment(s) so far, language {status['progress']['language']}", flush=True)
            last_segments = segments
        if status["error"] and status["status"] not in ("done", "failed"):
            print(f"           retrying: {status['error']['message']}", flush=True)
        if status["status"] in ("done", "failed"):
            return status
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"the call is still {status['status']} after {timeout:.0f} s")
        await asyncio.sleep(0.5)


async def run(args: argparse.Namespace) -> int:
    root = data_dir()
    workdir = root / "demo"
    workdir.mkdir(parents=True, exist_ok=True)
    recordings = workdir / "recordings"
    recordings.mkdir(exist_ok=True)
    if args.audio:
        source = Path(args.audio)
        if not source.is_file():
            print(f"error: {source} does not exist", file=sys.stderr)
            return 2
        name = f"{uuid.uuid4().hex}{source.suffix}"
        shutil.copyfile(source, recordings / name)
        print(f"Recording: {source}")
    else:
        sample, path = make_sample("es-billing-angry", recordings)
        name = path.name
        print(f"Recording: a Spanish sample call generated with espeak-ng:\n  \"{sample.text}\"")

    recorder = await Recorder(recordings).start()
    crm = await CrmReceiver(print_records=True).start()
    env = {
        "CALLMESH_DATA_DIR": str(root),
        "CRM_URL": crm.url,
        "RECORDING_ALLOWED_HOSTS": "127.0.0.1",
        "RECORDING_ALLOWED_NETWORKS": "127.0.0.0/8",
        "INGEST_DATABASE": str(workdir / "ingest.db"),
        "CRM_DATABASE": str(workdir / "crm-outbox.db"),
    }
    mesh: Mesh = new_mesh(env, workdir / "logs")
    mesh.workdir.mkdir(exist_ok=True)
    print("Starting the mesh (logs in %s) ..." % mesh.workdir, flush=True)
    try:
        await asyncio.to_thread(mesh.start)
        for svc in mesh.services.values():
            print(f"  {svc.name:<10} {svc.address}")
        call_id = args.call_id or f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        webhook = {"call_id": call_id, "recording_url": recorder.url_for(name)}
        if args.agent_channel:
            webhook["agent_channel"] = args.agent_channel
        if args.language:
            webhook["language"] = args.language
        async with aiohttp.ClientSession() as session:
            print(f"POST {mesh.ingest_url}/v1/calls {json.dumps(webhook)}")
            code, ack = await post_webhook(session, mesh.ingest_url, webhook, mesh.webhook_secret)
            print(f"  (signed: webhook-signature v1) → HTTP {code}: {json.dumps(ack)}")
            if code != 202:
                return 1
            status = await follow(session, ack["status_url"], args.timeout)
        out: dict
        if status["status"] == "done":
            record = (await crm.wait_for(call_id, 60)).body
            print("\nCRM record:")
            print(json.dumps(record, indent=2, ensure_ascii=False))
            out = record
            code = 0
        else:
            print(f"\nThe call failed at stage {status['error']['stage']}: {status['error']['message']}")
            out = status
            code = 1
        print(f"\nTrace id: {status['trace_id']}"
              + (f"  ({os.environ['JAEGER_UI_URL'].rstrip('/')}/trace/{status['trace_id']})" if os.environ.get("JAEGER_UI_URL") else ""))
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
            print(f"Written to {args.out}")
        return code
    except MeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        await asyncio.to_thread(mesh.stop)
        await recorder.stop()
        await crm.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="callmesh-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--audio", help="a recording to run instead of the generated Spanish sample")
    parser.add_argument("--agent-channel", choices=("left", "right"),
                        help="the recording is stereo with the agent on this channel")
    parser.add_argument("--language", help="language hint (ISO 639-1), instead of detection")
    parser.add_argument("--call-id", help="call id to use (default: a generated one)")
    parser.add_argument("--out", help="write the CRM record as JSON here (or the status, when the call fails)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the call (default 900)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        return asyncio.run(run(args))
    except SampleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
