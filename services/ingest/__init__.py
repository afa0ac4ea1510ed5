"""Ingest service: webhook and status API, durable job store, safe downloader and the pipeline worker."""
