"""OpenTelemetry metrics, scraped by Prometheus at ``/metrics`` on every service.

Instruments are made with :func:`meter` where the work happens (they are no-ops
until :func:`setup_metrics` installs the provider, as in tests of single pieces).
Values that live in a database (queue depth, oldest job) are read by an async
``refresh`` hook just before each scrape and reported by observable gauges.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from opentelemetry import metrics
from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource

from services.common.lifecycle import start_site

log = logging.getLogger(__name__)
REFRESH = web.AppKey("metrics_refresh", list)

# Bucket bounds (seconds) for stage and decode latencies: a short call on a GPU to an hour on a CPU.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


# Bucket bounds (seconds) for a store's writes: a commit on a quiet SSD takes a millisecond or less.
STORE_WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def store_write_seconds() -> metrics.Histogram:
    """``callmesh.store.write.duration``: one write transaction of a store, from its start to its commit on disk
    (or on the PostgreSQL server), by ``store`` and ``engine``. Webhooks and every stage wait for these: a disk
    whose syncs stall shows here first."""
    return meter("callmesh.store").create_histogram(
        "callmesh.store.write.duration", unit="s", explicit_bucket_boundaries_advisory=STORE_WRITE_BUCKETS,
        description="A store's write transaction, from its start to its commit on disk (store, engine)")


def setup_metrics(service: str) -> None:
    """Install a meter provider whose readings the Prometheus client library exposes."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    provider = MeterProvider(resource=Resource.create({"service.name": service}),
                             metric_readers=[PrometheusMetricReader()])
    metrics.set_meter_provider(provider)


def meter(name: str) -> metrics.Meter:
    return metrics.get_meter(name)


def outcome_counter(meter_name: str, name: str, description: str) -> collections.Counter[str]:
    """A counter by ``outcome`` kept in a plain dict that the metric reads at each scrape: an OpenTelemetry
    counter's ``add()`` costs a twentieth of a webhook's CPU, a dict's ``+= 1`` nothing measurable."""
    counts: collections.Counter[str] = collections.Counter()
    meter(meter_name).create_observable_counter(name, description=description, callbacks=[
        lambda _: [Observation(n, {"outcome": outcome}) for outcome, n in counts.items()]])
    return counts


async def metrics_handler(request: web.Request) -> web.Response:
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    for refresh in request.app.get(REFRESH, []):
        try:
            await refresh()
        except Exception:  # a scrape must answer even when a store is busy
            log.exception("metrics refresh failed")
    return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_metrics_route(app: web.Application, *refresh: Callable[[], Awaitable[None]]) -> None:
    """Serve ``GET /metrics`` on ``app``, running ``refresh`` hooks before each scrape."""
    app[REFRESH] = list(refresh)
    app.router.add_get("/metrics", metrics_handler)


async def start_metrics_site(listen: str, *refresh: Callable[[], Awaitable[None]]) -> tuple[web.AppRunner, str]:
    """A small HTTP server for ``/metrics`` beside a gRPC service; returns it and its bound address."""
    app = web.Application()
    add_metrics_route(app, *refresh)
    host, port = listen.rsplit(":", 1)
    runner, bound = await start_site(app, host, int(port), access_log=None)
    return runner, f"{host}:{bound}"
