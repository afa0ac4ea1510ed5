"""``python -m services.analyze``: load the LLM backend once, serve AnalysisService until SIGTERM."""

from __future__ import annotations

import logging

from callcenter.v1 import analyze_pb2, analyze_pb2_grpc
from services.analyze.analyzer import Analyzer
from services.analyze.backends import create_backend
from services.analyze.config import AnalyzeSettings
from services.analyze.servicer import AnalysisServicer
from services.common.grpc_server import ServiceBinding, serve
from services.common.limits import AdmissionLimiter
from services.common.telemetry import run_service

SERVICE = "analyze"
log = logging.getLogger(SERVICE)


async def amain() -> None:
    settings = AnalyzeSettings.from_env()
    backend = create_backend(settings.llm)
    analyzer = Analyzer(backend, settings.topics, settings.emotions, settings.llm.context_tokens,
                        settings.llm.max_answer_tokens, redact_pii=settings.redact_pii)
    log.info("personal data is %s before the LLM (LLM_PII_REDACTION)",
             "masked" if settings.redact_pii else "not masked")
    servicer = AnalysisServicer(analyzer, AdmissionLimiter(settings.max_concurrent, settings.max_queued))
    name = analyze_pb2.DESCRIPTOR.services_by_name["AnalysisService"].full_name
    binding = ServiceBinding(name, lambda s: analyze_pb2_grpc.add_AnalysisServiceServicer_to_server(servicer, s))
    await serve(SERVICE, settings.server, [binding], on_stop=backend.close)


def main() -> None:
    run_service(SERVICE, amain)


if __name__ == "__main__":
    main()
