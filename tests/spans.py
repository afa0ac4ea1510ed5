"""The spans this test process finishes, kept in memory: the services under test run in-process."""

from __future__ import annotations

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.telemetry import setup_tracing

# As in every service: spans are made (and carry trace ids) even with no exporter to Jaeger.
SPANS = InMemorySpanExporter()
setup_tracing("callmesh-tests").add_span_processor(SimpleSpanProcessor(SPANS))
