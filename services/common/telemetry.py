"""OpenTelemetry tracing shared by every service.

Spans are exported over OTLP/gRPC when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set
(Jaeger takes OTLP directly); without it spans are still made, so trace ids
show in logs and travel between services, but nothing is exported.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from services.common.config import ConfigError, env_str
from services.common.schema_version import NewerTables

if TYPE_CHECKING:
    import aiohttp
    from aiohttp import web

    Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
    Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

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


def shown_url(url: str) -> str:
    """``url`` as logs and traces show it: no user or password, and the values of its query hidden. Recorders
    hand out signed links (an S3 presigned URL carries X-Amz-Credential and X-Amz-Signature, others a token)
    that let whoever reads one fetch the recording, and some CRMs take their API key in the query."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(not a valid URL)"
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    query = "&".join(f"{name}=REDACTED" for name, _ in parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def client_trace_config() -> "aiohttp.TraceConfig":
    """Client spans and metrics for an aiohttp session, whose URLs are recorded as :func:`shown_url` shows them.
    In the stable HTTP conventions, as the server spans are (``url.full``, durations in seconds): the older ones
    time requests in milliseconds, against Prometheus' base unit."""
    from opentelemetry.instrumentation._semconv import _StabilityMode
    from opentelemetry.instrumentation.aiohttp_client import create_trace_config

    return create_trace_config(url_filter=lambda url: shown_url(str(url)), sem_conv_opt_in_mode=_StabilityMode.HTTP)


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


def server_span_middleware(name: str = "callmesh.http",
                           untraced: frozenset[str] = frozenset({"/healthz", "/metrics"})) -> "Middleware":
    """An aiohttp middleware giving each request one SERVER span, continuing the caller's W3C trace context.

    The span carries the stable HTTP semantic-convention attributes Jaeger shows (method, route,
    path, status) and is marked as an error on a 5xx. It does what the webhook's trace needs and no
    more: the contrib aiohttp-server instrumentation also records two metrics and reads the
    environment on every request, which cost a third of the webhook's CPU (``bench/webhook_load.py``);
    ingest counts its webhooks itself. Probes and scrapes (``untraced`` paths) make no span, so
    Jaeger is not filled with one trace per liveness check."""
    from aiohttp import web

    server_tracer = trace.get_tracer(name)

    @web.middleware
    async def middleware(request: web.Request, handler: "Handler") -> "web.StreamResponse":
        if request.path in untraced:
            return await handler(request)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else ""
        attributes = {"http.request.method": request.method, "url.path": request.path, "url.scheme": request.scheme}
        if route:
            attributes["http.route"] = route
        with server_tracer.start_as_current_span(
                f"{request.method} {route}" if route else request.method, context=propagate.extract(request.headers),
                kind=trace.SpanKind.SERVER, attributes=attributes,
                record_exception=False, set_status_on_exception=False) as span:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                _set_http_status(span, exc.status)
                raise
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__qualname__))
                raise
            _set_http_status(span, response.status)
            return response

    return middleware


def _set_http_status(span: trace.Span, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(trace.Status(trace.StatusCode.ERROR))


def run_service(service: str, amain: "Callable[[], Coroutine[Any, Any, None]]", *, uvloop: bool = False) -> None:
    """The shape of every ``__main__``: logging and tracing set up, ``amain()`` run (on uvloop when asked,
    see :func:`~services.common.lifecycle.run_loop`), spans flushed."""
    from services.common.lifecycle import run_loop
    from services.common.logs import setup_logging
    from services.common.metrics import setup_metrics

    setup_logging(service)
    setup_tracing(service)
    setup_metrics(service)
    try:
        run_loop(amain(), uvloop=uvloop)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        raise SystemExit(2) from None
    except NewerTables:  # logged when found, before the service drained
        raise SystemExit(3) from None
    finally:
        shutdown_tracing()
