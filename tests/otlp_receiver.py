"""An OTLP/gRPC trace receiver on loopback, built on opentelemetry-proto: what Jaeger would receive."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.server: grpc.aio.Server | None = None
        self.endpoint = ""

    async def Export(self, request, context):
        for resource_spans in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            service = attrs.get("service.name", "?")
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append(ReceivedSpan(service, span.name, span.trace_id.hex(), span.span_id.hex(),
                                                   span.parent_span_id.hex()))
        return trace_service_pb2.ExportTraceServiceResponse()

    async def start(self) -> "OtlpReceiver":
        self.server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.endpoint = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    def services_in(self, trace_id: str) -> set[str]:
        return {s.service for s in self.trace(trace_id)}

    def by_service(self, trace_id: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = defaultdict(list)
        for s in self.trace(trace_id):
            out[s.service].append(s.name)
        return dict(out)
