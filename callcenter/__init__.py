"""Generated protobuf and gRPC stubs for callcenter.v1."""
