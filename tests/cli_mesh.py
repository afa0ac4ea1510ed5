"""A mesh started the way a user starts it: ``callmesh up`` in a subprocess, stopped with Ctrl-C (SIGINT)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CALLMESH = [sys.executable, "-m", "callmesh.cli"]


@dataclass
class UpMesh:
    data: Path
    env: dict[str, str]
    addresses: dict[str, str]
    output: Path
    process: subprocess.Popen

    @property
    def ingest_url(self) -> str:
        return self.addresses["ingest_url"]

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """``callmesh ARGS`` as a user would type it, against this mesh (found through its mesh.json)."""
        return subprocess.run([*CALLMESH, *args], env=self.env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)


@pytest.fixture(scope="session")
def up_mesh(tmp_path_factory: pytest.TempPathFactory, whisper_dir: Path, llm_small: Path) -> Iterator[UpMesh]:
    data = tmp_path_factory.mktemp("callmesh-up")
    env = {**os.environ, "CALLMESH_DATA_DIR": str(data), "WHISPER_MODEL": str(whisper_dir),
           "LLM_MODEL": str(llm_small), "TRANSCRIBE_LISTEN": "127.0.0.1:0", "ANALYZE_LISTEN": "127.0.0.1:0",
           "CRM_SYNC_LISTEN": "127.0.0.1:0", "INGEST_PORT": "0", "PIPELINE_BACKOFF_INITIAL_SECONDS": "0.5",
           "PIPELINE_MAX_ATTEMPTS": "2", "DELIVERY_POLL_SECONDS": "0.5", "COLUMNS": "200", "NO_COLOR": "1"}
    for key in ("WEBHOOK_SECRETS", "API_TOKEN", "CALLMESH_URL", "TRANSCRIBE_ADDR"):
        env.pop(key, None)
    output = data / "up.out"
    with output.open("w") as out:
        process = subprocess.Popen([*CALLMESH, "up"], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    mesh_json = data / "mesh.json"
    deadline = time.monotonic() + 300
    while not mesh_json.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"callmesh up did not start:\n{output.read_text()[-3000:]}")
        time.sleep(0.1)
    mesh = UpMesh(data, env, json.loads(mesh_json.read_text()), output, process)
    yield mesh
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)


@pytest.fixture(scope="session")
def stereo_call(up_mesh: UpMesh, audio_dir: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """The stereo sample submitted with `callmesh submit`: (the command's result, the record it wrote)."""
    out = up_mesh.data / "cli-stereo.json"
    result = up_mesh.run("submit", str(audio_dir / "stereo-agent-left.wav"), "--stereo", "agent=left",
                         "--call-id", "cli-stereo", "--meta", "agent_id=A-42", "--meta", "queue=sales=EU",
                         "--out", str(out))
    return result, json.loads(out.read_text()) if out.exists() else {}
