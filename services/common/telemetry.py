"""OpenTelemetry tracing shared by every service.

Spans are exported over OTLP/gRPC when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set
(Jaeger takes OTLP directly); without it spans are still made, so trace ids
show in logs and travel between services, but nothing is exported.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from services.common.config import ConfigError, env_str

log = logging.getLogger(__name__)

_provider: TracerProvider | None = None


def setup_tracing(service: str, exporter: SpanExporter | None = None) -> TracerProvider:
    """Install the process's tracer provider for ``service`` (idempotent)."""
    global _provider
    if _provider is not None:
        return _provider
    provider = TracerProvider(resource=Resource.create({"service.name": service, "service.namespace": "callmesh"}))
    if exporter is None and env_str("OTEL_EXPORTER_OTLP_ENDPOINT", ""):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
        log.info("exporting traces over OTLP to %s", env_str("OTEL_EXPORTER_OTLP_ENDPOINT", ""))
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def shutdown_tracing() -> None:
    """Flush and stop the exporter; call last, after the servers stopped."""
    if _provider is not None:
        _provider.shutdown()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def current_traceparent() -> dict[str, str]:
    """The current W3C trace context as headers, to store beside a job."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def context_from(carrier: Mapping[str, str] | None):
    """The context stored by :func:`current_traceparent`, to continue its trace."""
    return propagate.extract(dict(carrier or {}))


def trace_id_hex(span: trace.Span | None = None) -> str:
    ctx = (span or trace.get_current_span()).get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def instrument_aiohttp_server() -> None:
    """Trace every aiohttp server application made from now on (idempotent)."""
    from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor

    instrumentor = AioHttpServerInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()


def run_service(service: str, amain: "Callable[[], Awaitable[None]]") -> None:
    """The shape of every ``__main__``: logging and tracing set up, ``amain()`` run, spans flushed."""
    import asyncio

    from services.common.logs import setup_logging

    from services.common.metrics import setup_metrics

    setup_logging(service)
    setup_tracing(service)
    setup_metrics(service)
    try:
        asyncio.run(amain())
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        raise SystemExit(2) from None
    finally:
        shutdown_tracing()
