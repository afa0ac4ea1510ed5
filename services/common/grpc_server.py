"""Bootstrap for the gRPC services: one ``serve()`` shape for all of them.

Builds a ``grpc.aio`` server with tracing, health and reflection beside the
servicer, binds the listen address (port 0 picks a free port), writes the bound
address to ``CALLMESH_READY_FILE`` when set, and on SIGTERM or SIGINT stops
accepting, lets in-flight calls finish within the grace period, then runs the
service's own cleanup.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor

from services.common.config import PLAINTEXT, GrpcServerSettings, TlsSettings
from services.common.lifecycle import freeze_startup_heap, install_stop_signals, write_ready_file
from services.common.metrics import start_metrics_site

log = logging.getLogger(__name__)

# Recordings travel in chunks; analysis requests carry whole transcripts.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.lb_policy_name", "round_robin"),
]


@dataclass
class ServiceBinding:
    """What a service registers on the server."""

    name: str  # full service name, e.g. "callcenter.v1.TranscriptionService"
    register: Callable[[grpc.aio.Server], None]


@dataclass
class RunningServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    address: str
    port: int
    services: tuple[str, ...]

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING, then stop with ``grace`` seconds for in-flight calls."""
        for name in (*self.services, ""):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials | None:
    """TLS for a server with a certificate; mutual TLS when ``client_auth``; None for plaintext."""
    if tls.cert is None or tls.key is None:
        return None
    return grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.ca if tls.client_auth else None,
                                       require_client_auth=tls.client_auth)


def channel_credentials(tls: TlsSettings) -> grpc.ChannelCredentials | None:
    """TLS for a client that trusts ``ca`` and presents its own certificate when it has one."""
    if not tls.enabled:
        return None
    return grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert)


async def start_server(listen: str, bindings: Iterable[ServiceBinding], tls: TlsSettings = PLAINTEXT) -> RunningServer:
    """Start a server on ``listen`` with health, reflection and tracing; over TLS when ``tls`` has a certificate."""
    bindings = list(bindings)
    server = grpc.aio.server(
        interceptors=[aio_server_interceptor()],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for b in bindings:
        b.register(server)
    names = tuple(b.name for b in bindings)
    reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    credentials = server_credentials(tls)
    port = server.add_secure_port(listen, credentials) if credentials else server.add_insecure_port(listen)
    if port == 0:
        raise RuntimeError(f"could not bind {listen}")
    await server.start()
    for name in (*names, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    host = listen.rsplit(":", 1)[0]
    address = f"{host}:{port}"
    return RunningServer(server, health_servicer, address, port, names)


async def serve(
    service: str,
    settings: GrpcServerSettings,
    bindings: Iterable[ServiceBinding],
    on_stop: Callable[[], Awaitable[None]] | None = None,
    metrics_refresh: Iterable[Callable[[], Awaitable[None]]] = (),
    stop: asyncio.Event | None = None,
) -> None:
    """Run until SIGTERM/SIGINT (or ``stop`` is set), then drain gracefully; /metrics beside it when configured."""
    running = await start_server(settings.listen, bindings, settings.tls)
    mode = "mutual TLS" if settings.tls.client_auth else "TLS" if settings.tls.cert else "plaintext"
    log.info("%s listening on %s (%s)", service, running.address, mode)
    extra: dict[str, str] = {}
    metrics_runner = None
    if settings.metrics_listen:
        metrics_runner, metrics_address = await start_metrics_site(settings.metrics_listen, *metrics_refresh)
        extra["metrics"] = f"http://{metrics_address}/metrics"
        log.info("%s metrics on %s", service, extra["metrics"])
    freeze_startup_heap()
    write_ready_file(settings.ready_file, running.address, **extra)
    stop = stop or asyncio.Event()
    install_stop_signals(stop)
    await stop.wait()
    log.info("%s stopping: draining in-flight calls for up to %.0f s", service, settings.grace_seconds)
    await running.stop(settings.grace_seconds)
    if on_stop is not None:
        await on_stop()
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    log.info("%s stopped", service)


def tls_options(tls: TlsSettings) -> list[tuple[str, str]]:
    """Channel options for TLS: the server name to expect when it is not the host dialled."""
    return [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []


def client_channel(target: str, tls: TlsSettings = PLAINTEXT) -> grpc.aio.Channel:
    """A traced client channel with the mesh's message limits and per-call balancing; TLS when configured."""
    credentials = channel_credentials(tls)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS, interceptors=aio_client_interceptors())
    return grpc.aio.secure_channel(target, credentials, options=[*_CHANNEL_OPTIONS, *tls_options(tls)],
                                   interceptors=aio_client_interceptors())
