"""Callmesh services: ingest, transcribe, analyze and crm, plus their shared package."""
