"""Shared fixtures: generated audio, the Whisper model, real servers on 127.0.0.1 port 0."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from callmesh.models import MODELS, is_installed  # noqa: E402
from callmesh.samples import SAMPLES, synthesize  # noqa: E402
from services.common.config import data_dir  # noqa: E402
from services.common.telemetry import setup_tracing  # noqa: E402
from tests.cli_mesh import stereo_call, up_mesh  # noqa: E402,F401  (fixtures)
from tests.ingest_harness import ingest, recorder  # noqa: E402,F401  (fixtures)
from tests.postgres_server import PostgresServer, start_postgres  # noqa: E402

# As in every service: spans are made (and carry trace ids) even with no exporter.
setup_tracing("callmesh-tests")

LONG_TEXT = (
    "Good morning, thank you for calling. I would like to ask about my last invoice. "
    "The amount is higher than usual and I do not understand the extra charges. "
    "Could you explain what the service fee is for and whether it will appear every month. "
    "I have been a customer for many years and I always paid on time. "
)


def require_model(key: str) -> Path:
    model = MODELS[key]
    root = data_dir()
    if not is_installed(model, root):
        pytest.fail(f"model {key} is not installed in {root}: run `python -m callmesh.models {key}` first",
                    pytrace=False)
    return model.path(root)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server on 127.0.0.1 for this test run (Debian's packages, installed by setup)."""
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """A fresh empty database on that server."""
    return postgres.new_database()


@pytest.fixture(scope="session")
def whisper_dir() -> Path:
    return require_model("whisper-base")


@pytest.fixture(scope="session")
def llm_small() -> Path:
    return require_model("qwen2.5-coder-0.5b") / "model.gguf"


@pytest.fixture(scope="session")
def llm_main() -> Path:
    return require_model("qwen2.5-coder-1.5b") / "model.gguf"


@pytest.fixture(scope="session")
def audio_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Recordings generated for this run with espeak-ng and ffmpeg; nothing is committed."""
    d = tmp_path_factory.mktemp("audio")
    for key, sample in SAMPLES.items():
        synthesize(sample.text, sample.voice, d / f"{key}.wav")
    synthesize(LONG_TEXT * 3, "en-us", d / "long-en.wav", speed=160)
    # The Spanish call as 8 kHz telephone-band mp3.
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(d / "es-billing-angry.wav"), "-ar", "8000",
                    "-ac", "1", str(d / "es-billing-angry-8k.mp3")], check=True)
    # Stereo: the agent (left) speaks first, the customer (right) answers after.
    synthesize("Thank you for calling, how can I help you today?", "en-us", d / "agent.wav")
    synthesize("My parcel never arrived and I want a refund.", "en-us", d / "customer.wav")
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(d / "agent.wav"), "-i", str(d / "customer.wav"),
                    "-filter_complex", "[1:a]adelay=5000[c];[0:a]apad[l];[l][c]join=inputs=2:channel_layout=stereo:map=0.0-FL|1.0-FR[a]",
                    "-map", "[a]", "-shortest", str(d / "stereo-agent-left.wav")], check=True)
    # A call that switches language: the English call, a second of silence, then the Spanish one.
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(d / "en-internet-angry.wav"), "-f", "lavfi",
                    "-i", "anullsrc=r=22050:cl=mono", "-i", str(d / "es-billing-angry.wav"), "-filter_complex",
                    "[1:a]atrim=duration=1[s];[0:a][s][2:a]concat=n=3:v=0:a=1[a]", "-map", "[a]", "-ar", "16000",
                    str(d / "switch-en-es.wav")], check=True)
    # Edge cases only the transcriber can judge: 30 s of silence, pink noise, an MP3 cut at 40 %.
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "30",
                    str(d / "silence-30s.wav")], check=True)
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "anoisesrc=d=15:c=pink:a=0.3:r=16000",
                    "-ac", "1", str(d / "noise-15s.wav")], check=True)
    mp3 = (d / "es-billing-angry-8k.mp3").read_bytes()
    (d / "truncated.mp3").write_bytes(mp3[: len(mp3) * 2 // 5])
    (d / "not-audio.txt").write_text("<html><body>This is not a recording.</body></html>\n" * 20)
    # Looks like WAV from its first bytes, but the rest is garbage.
    (d / "broken.wav").write_bytes(b"RIFF\x24\x08\x00\x00WAVEfmt " + os.urandom(4000))
    return d
