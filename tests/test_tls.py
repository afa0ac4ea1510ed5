"""gRPC between the services over TLS and mutual TLS, with a CA made for the test.

A real grpc.aio server on 127.0.0.1 port 0 (health service only: the bootstrap
every service uses); the end-to-end mesh in test_end_to_end runs over mutual TLS too.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from unittest import mock

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import PLAINTEXT, ConfigError, TlsSettings
from services.common.grpc_server import RunningServer, client_channel, start_server
from services.common.healthcheck import check
from tests.tls import Authority, Issued, mtls_env


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Authority, Issued, Issued, Issued]:
    d = tmp_path_factory.mktemp("pki")
    ca = Authority.create(d)
    rogue = Authority.create(d, "rogue-ca")
    return ca, ca.issue(d, "transcribe"), ca.issue(d, "ingest"), rogue.issue(d, "intruder")


def tls_from(env: dict[str, str]) -> TlsSettings:
    with mock.patch.dict(os.environ, env):
        return TlsSettings.from_env()


@pytest_asyncio.fixture
async def mtls_server(pki) -> AsyncIterator[RunningServer]:
    ca, server_cert, _, _ = pki
    server = await start_server("127.0.0.1:0", [], tls_from(mtls_env(ca, server_cert)))
    yield server
    await server.stop(0)


async def health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status


async def test_client_with_a_certificate_from_the_ca_is_served(mtls_server: RunningServer, pki) -> None:
    ca, _, client_cert, _ = pki
    async with client_channel(mtls_server.address, tls_from(mtls_env(ca, client_cert))) as channel:
        assert await health(channel) == health_pb2.HealthCheckResponse.SERVING


async def test_client_without_a_certificate_is_refused(mtls_server: RunningServer, pki) -> None:
    ca = pki[0]
    async with client_channel(mtls_server.address, tls_from({"GRPC_TLS_CA": str(ca.cert)})) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_client_with_a_certificate_from_another_ca_is_refused(mtls_server: RunningServer, pki) -> None:
    ca, _, _, intruder = pki
    async with client_channel(mtls_server.address, tls_from(mtls_env(ca, intruder))) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_plaintext_client_is_refused_by_a_tls_server(mtls_server: RunningServer) -> None:
    async with client_channel(mtls_server.address, PLAINTEXT) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_server_name_override_checks_the_certificate_name(pki) -> None:
    ca, server_cert, client_cert, _ = pki
    server = await start_server("127.0.0.1:0", [], tls_from(mtls_env(ca, server_cert)))
    try:
        env = mtls_env(ca, client_cert)
        async with client_channel(server.address, tls_from({**env, "GRPC_TLS_SERVER_NAME": "transcribe"})) as ok:
            assert await health(ok) == health_pb2.HealthCheckResponse.SERVING
        async with client_channel(server.address, tls_from({**env, "GRPC_TLS_SERVER_NAME": "analyze"})) as wrong:
            with pytest.raises(grpc.aio.AioRpcError):
                await health(wrong)
    finally:
        await server.stop(0)


async def test_health_check_command_speaks_mutual_tls(mtls_server: RunningServer, pki) -> None:
    ca, _, client_cert, _ = pki
    with mock.patch.dict(os.environ, mtls_env(ca, client_cert)):
        assert await asyncio.to_thread(check, mtls_server.address)
    with mock.patch.dict(os.environ, {"GRPC_TLS_CA": str(ca.cert)}):
        assert not await asyncio.to_thread(check, mtls_server.address, "", 2)


def test_mutual_tls_without_a_certificate_is_a_configuration_error(pki) -> None:
    with pytest.raises(ConfigError, match="GRPC_TLS_CLIENT_AUTH"):
        tls_from({"GRPC_TLS_CA": str(pki[0].cert), "GRPC_TLS_CLIENT_AUTH": "1"})


def test_certificate_without_its_key_is_a_configuration_error(pki) -> None:
    with pytest.raises(ConfigError, match="go together"):
        tls_from({"GRPC_TLS_CERT": str(pki[1].cert)})


def test_unreadable_certificate_path_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        tls_from({"GRPC_TLS_CA": str(tmp_path / "missing.pem")})
