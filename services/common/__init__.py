"""The one package the Callmesh services share: config, logging, telemetry and gRPC bootstrap.

The generated stubs live in the top-level ``callcenter.v1`` package; services talk to
each other only through them.
"""
