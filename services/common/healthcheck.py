"""``python -m services.common.healthcheck ADDRESS [SERVICE]``: exit 0 when the gRPC service reports SERVING.

For container health checks: uses the standard grpc.health.v1 protocol, over TLS when GRPC_TLS_* say so.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import TlsSettings
from services.common.grpc_server import channel_credentials, tls_options


def serving(address: str, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """(SERVING?, what the service said or why it could not be asked)."""
    tls = TlsSettings.from_env()
    credentials = channel_credentials(tls)
    channel = (grpc.secure_channel(address, credentials, tls_options(tls)) if credentials
               else grpc.insecure_channel(address))
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                               timeout=timeout)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    return (reply.status == health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def check(address: str, service: str = "", timeout: float = 3.0) -> bool:
    ok, said = serving(address, service, timeout)
    print(f"{address} {service or '(server)'}: {said}", file=sys.stdout if ok else sys.stderr)
    return ok


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    return 0 if check(args[0], args[1] if len(args) > 1 else "") else 1


if __name__ == "__main__":
    sys.exit(main())
