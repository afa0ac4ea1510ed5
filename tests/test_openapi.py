"""The ingest HTTP API matches its OpenAPI document, and schemathesis cannot make it fail.

Schemathesis (its CLI, as CI would run it) fuzzes a real ingest process on
127.0.0.1: every operation, examples, edge cases, random data and stateful
sequences; the checks are no 5xx and responses that match the document.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from callmesh.mesh import Mesh, new_mesh
from callmesh.standins import new_webhook_secret
from services.ingest.api import create_app
from services.ingest.openapi import openapi_document
from services.ingest.web import WebPages
from tests.ingest_harness import VERIFIER, Ingest

ST = Path(sys.executable).with_name("st")
CHECKS = ",".join(["not_a_server_error", "status_code_conformance", "content_type_conformance",
                   "response_schema_conformance", "response_headers_conformance"])
TOKEN = "fuzz-token"


def start_ingest(tmp_path: Path, **env: str) -> Iterator[Mesh]:
    mesh = new_mesh({"INGEST_PORT": "0", "CALLMESH_DATA_DIR": str(tmp_path / "data"), "API_TOKEN": TOKEN,
                     "RECORDING_ALLOWED_HOSTS": "127.0.0.1", "RECORDING_ALLOWED_NETWORKS": "127.0.0.0/8",
                     "TRANSCRIBE_ADDR": "127.0.0.1:9", "PIPELINE_MAX_ATTEMPTS": "1", **env}, tmp_path)
    mesh.start_service("ingest", timeout=60)
    try:
        yield mesh
    finally:
        code = mesh.stop_service("ingest")
        assert code == 0, (tmp_path / "ingest.log").read_text()[-3000:]


@pytest.fixture
def unsigned_ingest(tmp_path: Path) -> Iterator[Mesh]:
    yield from start_ingest(tmp_path, WEBHOOK_ALLOW_UNSIGNED="1")


@pytest.fixture
def signed_ingest(tmp_path: Path) -> Iterator[Mesh]:
    yield from start_ingest(tmp_path, WEBHOOK_SECRETS=new_webhook_secret())


def fuzz(mesh: Mesh, tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [str(ST), "run", f"{mesh.ingest_url}/openapi.json", "--checks", CHECKS, "--max-examples", "40",
           "--seed", "20261125", "--generation-database", "none", "--no-color", "--request-timeout", "10",
           "--workers", "2", "-H", f"Authorization: Bearer {TOKEN}", "--report-dir", str(tmp_path / "report")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_every_route_is_in_the_openapi_document(ingest: Ingest) -> None:
    app = create_app(ingest.store, ingest.worker, ingest.worker.downloader.policy, VERIFIER)
    documented = {(re.sub(r":[A-Za-z]+$", "", path), method.upper())
                  for path, ops in openapi_document()["paths"].items() for method in ops}
    routes = {(r.resource.canonical, r.method) for r in app.router.routes() if r.method != "HEAD"}
    pages = {(path, method) for method, path in WebPages.ROUTES}  # HTML for people, not the API
    assert routes - pages == documented


async def test_openapi_json_is_served(ingest: Ingest) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{ingest.url}/openapi.json") as resp:
            assert resp.status == 200
            doc = await resp.json()
    assert doc["openapi"].startswith("3.1") and "/v1/calls" in doc["paths"]


def test_schemathesis_finds_no_server_error_with_unsigned_webhooks(unsigned_ingest: Mesh, tmp_path: Path) -> None:
    result = fuzz(unsigned_ingest, tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "passed" in result.stdout


def test_schemathesis_finds_no_server_error_on_signed_webhooks(signed_ingest: Mesh, tmp_path: Path) -> None:
    result = fuzz(signed_ingest, tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "passed" in result.stdout
