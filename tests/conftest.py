"""Shared fixtures: generated audio, the Whisper model, real servers on 127.0.0.1 port 0."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from callmesh.models import MODELS, is_installed  # noqa: E402
from services.common.config import data_dir  # noqa: E402
from tests.audio import make_test_audio  # noqa: E402
from tests.cli_mesh import stereo_call, up_mesh  # noqa: E402,F401  (fixtures)
from tests.crm_harness import receiver  # noqa: E402,F401  (fixture)
from tests.ingest_harness import ingest, recorder  # noqa: E402,F401  (fixtures)
from tests.postgres_server import PostgresServer, start_postgres  # noqa: E402
from tests.spans import SPANS  # noqa: E402


@pytest.fixture
def finished_spans() -> InMemorySpanExporter:
    """The spans this process finishes from the start of the test on (servers run in-process)."""
    SPANS.clear()
    return SPANS


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
    """Recordings generated for this run with espeak-ng and ffmpeg; nothing is committed.

    CALLMESH_TEST_AUDIO names a folder of them made earlier by ``python -m tests.audio DIR``, for a
    machine without espeak-ng and ffmpeg (a GPU host that runs the GPU tests, say)."""
    made = os.environ.get("CALLMESH_TEST_AUDIO")
    if made:
        return Path(made)
    return make_test_audio(tmp_path_factory.mktemp("audio"))
