"""Callmesh tooling that is not a service: model setup, the demo and stand-ins for outside systems."""
