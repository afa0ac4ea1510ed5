"""Ingest over real transcribe, analyze and crm services whose LLM answers only when a test lets it.

The LLM is the Ollama stand-in (Ollama is not part of the product), held by ``gate``: a test
can look at a call while its analysis waits at the LLM, then set ``gate`` to let it answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from callcenter.v1 import analyze_pb2_grpc
from callmesh.standins import CrmReceiver, Recorder
from services.analyze.backends import OllamaBackend
from services.analyze.servicer import AnalysisServicer
from services.common.grpc_server import ServiceBinding, start_server
from services.common.limits import AdmissionLimiter
from services.transcribe.engine import WhisperEngine
from tests.crm_harness import start_crm
from tests.ingest_harness import Ingest, running_ingest
from tests.test_analyze import FakeOllama, analyzer, settings
from tests.test_transcribe import _serve


@dataclasses.dataclass
class HeldLlmMesh:
    ingest: Ingest
    gate: asyncio.Event  # set: the LLM answers
    ollama: FakeOllama  # its ``requests``: what the LLM was sent
    receiver: CrmReceiver  # the CRM
    recorder: Recorder  # serves the test recordings


@contextlib.asynccontextmanager
async def held_llm_mesh(engine: WhisperEngine, tmp_path: Path, audio_dir: Path, *, analyses_queued: int,
                        **ingest_settings: Any) -> AsyncIterator[HeldLlmMesh]:
    """The mesh, its analyze service taking one analysis at a time and queueing ``analyses_queued``;
    ``ingest_settings`` go to :func:`tests.ingest_harness.running_ingest`."""
    gate = asyncio.Event()
    ollama = await FakeOllama([], by_schema=True, gate=gate).start()
    llm = dataclasses.replace(settings(ollama.url), timeout_seconds=300)
    servicer = AnalysisServicer(analyzer(OllamaBackend(llm)), AdmissionLimiter(1, analyses_queued))
    analyze = await start_server("127.0.0.1:0", [ServiceBinding(
        "callcenter.v1.AnalysisService", lambda s: analyze_pb2_grpc.add_AnalysisServiceServicer_to_server(servicer, s))])
    transcribe, _ = await _serve(engine, max_running=1, max_queued=4)
    receiver = await CrmReceiver().start()
    crm = await start_crm(tmp_path / "outbox.db", receiver)
    recorder = await Recorder(audio_dir).start()
    try:
        async with running_ingest(tmp_path, transcribe_addr=transcribe.address, analyze_addr=analyze.address,
                                  crm_addr=crm.server.address, transcribe_timeout=120, **ingest_settings) as ingest:
            yield HeldLlmMesh(ingest, gate, ollama, receiver, recorder)
    finally:
        gate.set()
        await recorder.stop()
        await crm.close()
        await receiver.stop()
        await transcribe.stop(1)
        await analyze.stop(1)
        await ollama.stop()
