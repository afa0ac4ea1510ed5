"""Webhook intake throughput: signed webhooks into ingest's durable queue, against a bare HTTP baseline.

    .venv/bin/python -m bench.webhook_load [--webhooks 2000] [--in-flight 100] [--runs 5]

(also part of ``python -m bench``)

Both servers are separate processes on 127.0.0.1, on the same event loop
(uvloop). The baseline is an aiohttp handler that reads the body and answers 202
(no signature check, no validation, no fsync). Ingest verifies the Standard
Webhooks signature, validates, traces, logs (at its default level, INFO), and
commits each call to SQLite (WAL, synchronous=FULL) before it answers; its
pipeline worker runs as in production: it takes PIPELINE_CONCURRENCY calls and
starts their downloads from a recorder that is slow to answer (as a busy one
is), so the rest stay queued, as they do behind a burst. The client is the same
for both: the same signed webhooks (the baseline ignores the signature) over the
same connection pool. Prints webhooks/s, latency percentiles and the ratio to the
baseline measured in the same run.

The open loop (200 webhooks/s, latency from each webhook's departure) has a
third server beside the two: the bare handler doing a fixed piece of
pure-Python work per webhook (``CONTROL_WORK_MS``), which comes to about the CPU
that ingest spends on one. Its p99 is what this machine does to a handler of
that cost, whatever the handler is; the CPU time of each server per webhook is
kept too.

Where ``wrk`` (Debian's package) is installed, the closed loop runs a second time
with it as the client: wrk is C, so it leaves more of the two cores to the
servers than the Python client does, and shows what each server can take. Its
webhooks are signed here beforehand and sent in order by a Lua script; wrk's own
rate counts its fixed duration, so the script times the run itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.common import RUNS, Result, interleaved, interleaved_all, ratio_result, span, table, value_result
from callmesh.mesh import new_mesh
from callmesh.standins import post_webhook, signed_headers
from services.common.lifecycle import freeze_startup_heap, run_loop, start_site

OPEN_LOOP_RATE = 200  # webhooks per second offered in the open-loop latency run
# The control in the open loop: the bare handler plus this much pure-Python work per webhook, which at 200/s
# comes to about the CPU per webhook that ingest spends (both are printed).
CONTROL_WORK_MS = 1.0
WRK_WEBHOOKS = 10000  # per wrk run: wrk sends 2,000 in well under a second to the bare handler


def busy_work(iterations: int) -> int:
    """Pure-Python CPU work, as a handler's own code is: ``iterations`` multiply-adds."""
    total = 0
    for i in range(iterations):
        total += i * i
    return total


def iterations_for(ms: float) -> int:
    """How many :func:`busy_work` iterations take ``ms`` milliseconds here, by the fastest of a few timings."""
    probe = 20000
    fastest = math.inf
    for _ in range(20):
        started = time.perf_counter()
        busy_work(probe)
        fastest = min(fastest, time.perf_counter() - started)
    return max(1, round(probe * ms / 1000 / fastest))


def baseline_handler(iterations: int = 0) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The bare handler: reads the body and answers 202, after ``iterations`` of :func:`busy_work` (none by default)."""

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        busy_work(iterations)
        return web.json_response({"status": "received"}, status=202)

    return handler


class SlowRecorder:
    """A recorder on loopback that takes the download request and does not answer until the run ends."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _hold(self, request: web.Request) -> web.Response:
        await self.release.wait()
        return web.Response(status=503)

    async def __aenter__(self) -> "SlowRecorder":
        app = web.Application()
        app.router.add_get("/{name:.*}", self._hold)
        self.runner, port = await start_site(app, "127.0.0.1", 0, access_log=None, shutdown_timeout=1)
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self.runner is not None
        await self.runner.cleanup()


def serve_baseline(ready: Path, work_ms: float = 0.0) -> None:
    """The bare handler; with ``work_ms``, the bare handler plus that much pure-Python CPU work per webhook."""
    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/calls", baseline_handler(iterations_for(work_ms) if work_ms else 0))
        _, port = await start_site(app, "127.0.0.1", 0, access_log=None)
        freeze_startup_heap()  # as every service does once started
        ready.write_text(json.dumps({"address": f"127.0.0.1:{port}"}))
        await asyncio.Event().wait()

    run_loop(main(), uvloop=True)  # the loop ingest runs on, so the two servers differ only in their work


def webhook_payload(prefix: str, i: int, recorder: str) -> dict[str, str]:
    """The ``i``-th webhook of a run: a call id of its own and a recording on the slow recorder."""
    return {"call_id": f"{prefix}-{i:05d}", "recording_url": f"{recorder}/r/{i}.wav"}


async def blast(url: str, secret: str | None, n: int, connections: int, prefix: str,
                rate: float | None = None, recorder: str = "http://127.0.0.1:9") -> tuple[float, list[float]]:
    """``n`` signed webhooks over ``connections``: as fast as answers come back (closed loop), or, with
    ``rate``, webhook i leaving at i/rate seconds whatever the answers do (open loop, where the latency
    counts from the planned departure). Returns (seconds, sorted latencies)."""
    gate = asyncio.Semaphore(connections)
    latencies: list[float] = []

    async def one(session: aiohttp.ClientSession, i: int, start: float) -> None:
        payload = webhook_payload(prefix, i, recorder)
        if rate:
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        t0 = time.perf_counter()
        async with gate:
            if not rate:
                t0 = time.perf_counter()
            code, body = await post_webhook(session, url, payload, secret)
            latencies.append(time.perf_counter() - t0)
        if code != 202:
            raise RuntimeError(f"HTTP {code}: {body}")

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(one(session, i, start) for i in range(n)))
        return time.perf_counter() - start, sorted(latencies)


WRK_SCRIPT = """
local ffi = require("ffi")
ffi.cdef[[ typedef struct { long tv_sec; long tv_nsec; } callmesh_ts; int clock_gettime(int, callmesh_ts*); ]]
local ts = ffi.new("callmesh_ts")
local function now() ffi.C.clock_gettime(1, ts); return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9 end
local threads = {}
function setup(thread) thread:set("id", #threads); table.insert(threads, thread) end
function init(args) sent = 0; answered = 0; refused = 0; started = 0; finished = 0 end
request = function()
  if started == 0 then started = now() end
  local i = sent * THREADS + id + 1
  sent = sent + 1
  return requests[math.min(i, #requests)]
end
response = function(status, headers, body)
  answered = answered + 1
  if status ~= 202 then refused = refused + 1 end
  if answered == SHARE then
    finished = now()
    io.write("thread done\\n"); io.flush()
  end
end
function done(summary, latency, requests)
  local first, last, bad = math.huge, 0, 0
  for _, t in ipairs(threads) do
    first = math.min(first, t:get("started")); last = math.max(last, t:get("finished"))
    bad = bad + t:get("refused")
  end
  io.write(string.format('{"seconds": %.6f, "p99_ms": %.3f, "mean_ms": %.3f, "refused": %d}\\n', last - first,
                         latency:percentile(99) / 1000, latency.mean / 1000, bad))
end
"""


def wrk_script(url: str, secret: str, n: int, connections: int, threads: int, prefix: str, recorder: str) -> str:
    """A wrk script that sends ``n`` webhooks signed now, in order, each once (and up to ``connections`` more
    while the last answers come in), and prints the seconds until each thread had its share answered."""
    host = url.split("//", 1)[1].split("/", 1)[0]
    requests = []
    for i in range(n + connections + threads):
        body = json.dumps(webhook_payload(prefix, i, recorder))
        headers = {"Host": host, **signed_headers(secret, body.encode()), "Content-Length": str(len(body))}
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        requests.append(json.dumps(f"POST /v1/calls HTTP/1.1\r\n{head}\r\n{body}"))
    return (f"local THREADS = {threads}\nlocal SHARE = {n // threads}\nrequests = {{\n" + ",\n".join(requests)
            + "\n}\n" + WRK_SCRIPT)


async def wrk_blast(url: str, script: Path, connections: int, threads: int) -> tuple[float, float, float]:
    """Runs wrk with ``script`` and stops it once every thread had its share answered:
    (seconds, p99 ms, mean ms)."""
    proc = await asyncio.create_subprocess_exec(
        "wrk", f"-t{threads}", f"-c{connections}", "-d120s", "--latency", "-s", str(script), url + "/v1/calls",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    finished = 0
    while finished < threads:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=130)
        if not line:
            break
        finished += line.strip() == b"thread done"
    proc.send_signal(signal.SIGINT)  # wrk then ends its run at once instead of sleeping out -d
    out, err = await proc.communicate()
    summary = next((json.loads(x) for x in out.decode().splitlines() if x.startswith("{")), None)
    if finished < threads or summary is None:
        raise RuntimeError(f"wrk did not finish: {out.decode()[-500:]} {err.decode()[-500:]}")
    if summary["refused"]:
        raise RuntimeError(f"{summary['refused']} webhooks were not answered 202")
    return summary["seconds"], summary["p99_ms"], summary["mean_ms"]


def pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(len(values) * p))] * 1000


def closed_loop_floor(in_flight: int) -> str:
    """Why a closed loop's p99 has a floor: its mean latency is the number in flight over the rate."""
    return (f"in a closed loop the mean latency is {in_flight} in flight / webhooks per second, and the p99 "
            "is above the mean")


async def webhook_ack(work: Path, n: int, in_flight: int, runs: int) -> list[Result]:
    """Interleaved runs: ``n`` webhooks with ``in_flight`` connections to the baseline, then to ingest."""
    async with SlowRecorder() as recorder:
        return await _webhook_ack(work, n, in_flight, runs, recorder.url)


async def _webhook_ack(work: Path, n: int, in_flight: int, runs: int, recorder: str) -> list[Result]:
    ready = work / "baseline.ready"
    baseline = subprocess.Popen([sys.executable, "-m", "bench.webhook_load", "--serve-baseline", str(ready)])
    busy_ready = work / "busy.ready"
    busy = subprocess.Popen([sys.executable, "-m", "bench.webhook_load", "--serve-baseline", str(busy_ready),
                             "--work-ms", str(CONTROL_WORK_MS)])
    # Ingest logs at its default level (INFO), as deployed: a line per call received is part of each webhook's cost.
    mesh = new_mesh({"INGEST_PORT": "0", "CALLMESH_DATA_DIR": str(work / "data"),
                     "RECORDING_ALLOWED_HOSTS": "127.0.0.1", "RECORDING_ALLOWED_NETWORKS": "127.0.0.0/8",
                     "RECORDING_READ_TIMEOUT_SECONDS": "3600",
                     "TRANSCRIBE_ADDR": "127.0.0.1:9", "ANALYZE_ADDR": "127.0.0.1:9", "CRM_SYNC_ADDR": "127.0.0.1:9"},
                    work)
    b_lat: list[list[float]] = []
    i_lat: list[list[float]] = []
    counter = iter(range(1000))

    async def to_ingest(count: int, prefix: str, rate: float | None = None) -> tuple[float, list[float]]:
        return await blast(mesh.ingest_url, mesh.webhook_secret, count, in_flight, f"{prefix}{next(counter)}", rate,
                           recorder)

    try:
        mesh.start_service("ingest", timeout=60)
        while not (ready.exists() and busy_ready.exists()):
            time.sleep(0.05)
        base_url = "http://" + json.loads(ready.read_text())["address"]
        busy_url = "http://" + json.loads(busy_ready.read_text())["address"]
        await blast(base_url, mesh.webhook_secret, 200, in_flight, "warm")
        await blast(busy_url, mesh.webhook_secret, 200, in_flight, "warm")
        await to_ingest(200, "warm")
        freeze_startup_heap()  # this client too: its own full collections would stall both sides' answers

        async def bare() -> float:
            t, lat = await blast(base_url, mesh.webhook_secret, n, in_flight, f"base{next(counter)}")
            b_lat.append(lat)
            return n / t

        async def ingest() -> float:
            t, lat = await to_ingest(n, "run")
            i_lat.append(lat)
            return n / t

        bare_rates, ingest_rates = await interleaved(bare, ingest, runs)
        paced = OPEN_LOOP_RATE * 10
        paced_cpu: dict[str, list[float]] = {"bare": [], "busy": [], "ingest": []}

        def open_loop(name: str, url: str, pid: int) -> Callable[[], Awaitable[float]]:
            async def one() -> float:
                cpu = cpu_seconds(pid)
                _, lat = await blast(url, mesh.webhook_secret, paced, in_flight, f"p{name}{next(counter)}",
                                     OPEN_LOOP_RATE, recorder)
                paced_cpu[name].append((cpu_seconds(pid) - cpu) * 1000 / paced)
                return pct(lat, 0.99)
            return one

        paced_writes: list[tuple[int, int, float]] = []
        ingest_open_loop = open_loop("ingest", mesh.ingest_url, mesh.services["ingest"].process.pid)

        async def ingest_paced() -> float:
            metrics_url = mesh.services["ingest"].metrics_url
            before = await asyncio.to_thread(store_writes, metrics_url)
            p99_ms = await ingest_open_loop()
            paced_writes.append(slow_writes(before, await asyncio.to_thread(store_writes, metrics_url)))
            return p99_ms

        paced_bare, paced_busy, paced_ingest = await interleaved_all(
            (open_loop("bare", base_url, baseline.pid), open_loop("busy", busy_url, busy.pid), ingest_paced), runs)
        servers = {"bare": (base_url, baseline.pid), "ingest": (mesh.ingest_url, mesh.services["ingest"].process.pid)}
        with_wrk = await _wrk_runs(work, servers, mesh.webhook_secret, in_flight, runs, recorder, counter) \
            if shutil.which("wrk") else []
    finally:
        mesh.stop()
        for server in (baseline, busy):
            server.terminate()
            server.wait()
    ratios = [i / b for i, b in zip(ingest_rates, bare_rates)]
    cpu_ms = {name: statistics.median(values) for name, values in paced_cpu.items()}
    p99 = [pct(lat, 0.99) for lat in i_lat]
    bare_p99 = [pct(lat, 0.99) for lat in b_lat]
    mean_ms = [statistics.fmean(lat) * 1000 for lat in i_lat]
    bare_mean_ms = [statistics.fmean(lat) * 1000 for lat in b_lat]
    return [
        ratio_result("webhook ack throughput vs bare", ratios, ">= 0.5", lambda v: v >= 0.5,
                     f"{n} signed webhooks, {in_flight} connections: ingest {span(ingest_rates, 0)}/s, "
                     f"bare {span(bare_rates, 0)}/s"),
        value_result("webhook ack p99 latency", p99, "ms", "<= 25", lambda v: v <= 25,
                     f"closed loop, {in_flight} in flight; mean {span(mean_ms)} ms; bare p99 {span(bare_p99)} ms, "
                     f"mean {span(bare_mean_ms)} ms; {closed_loop_floor(in_flight)}"),
        *with_wrk,
        value_result(f"webhook ack p99 at {OPEN_LOOP_RATE}/s", paced_ingest, "ms", "<= 25", lambda v: v <= 25,
                     f"open loop, {paced} webhooks over 10 s, up to {in_flight} connections; bare p99 "
                     f"{span(paced_bare)} ms; server CPU per webhook {cpu_ms['ingest']:.2f} ms against "
                     f"{cpu_ms['bare']:.2f} ms; ingest's job-store writes (grouped commits) over "
                     f"{SLOW_WRITE_SECONDS * 1000:.0f} ms, by run: "
                     + ", ".join(f"{slow} of {total} (slowest under {slowest * 1000:g} ms)"
                                 for slow, total, slowest in paced_writes), cpu_ms_per_webhook=paced_cpu),
        value_result(f"webhook ack p99 at {OPEN_LOOP_RATE}/s, bare + CPU", paced_busy, "ms", "(control)", None,
                     f"the bare handler doing {CONTROL_WORK_MS:g} ms of pure-Python work per webhook before it "
                     f"answers, in the same open loop: server CPU per webhook {cpu_ms['busy']:.2f} ms, ingest's "
                     f"{cpu_ms['ingest']:.2f} ms; what this machine's tail is for a handler that costs about what "
                     "ingest costs", cpu_ms_per_webhook=paced_cpu["busy"]),
    ]


SLOW_WRITE_SECONDS = 0.025  # a store write this long takes a webhook past the p99 goal on its own


def store_writes(metrics_url: str) -> dict[float, float]:
    """Ingest's job-store writes so far, as its ``/metrics`` counts them: bucket bound (s) → writes up to it."""
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        scrape = resp.read().decode()
    return {float(re.search(r'le="([^"]+)"', labels)[1]): float(value) for labels, value in re.findall(
        r"^callmesh_store_write_duration_seconds_bucket\{([^}]*)\} (\S+)$", scrape, re.M)
        if 'store="ingest.jobs"' in labels}


def slow_writes(before: dict[float, float], after: dict[float, float]) -> tuple[int, int, float]:
    """Between two :func:`store_writes` readings: (writes over SLOW_WRITE_SECONDS, writes, the bucket bound the
    slowest stayed under)."""
    done = {bound: after[bound] - before.get(bound, 0.0) for bound in after}
    total = done.get(math.inf, 0.0)
    slowest = min((bound for bound, n in done.items() if n >= total), default=math.inf)
    return int(total - done.get(SLOW_WRITE_SECONDS, 0.0)), int(total), slowest


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _wrk_runs(work: Path, servers: dict[str, tuple[str, int]], secret: str, in_flight: int, runs: int,
                    recorder: str, counter: Iterator[int]) -> list[Result]:
    """The closed loop again with wrk as the client, interleaved, each run with webhooks signed just before.
    ``servers``: the URL and process id of "bare" and "ingest"; the server's CPU time per webhook is kept too."""
    threads = 2
    p99: dict[str, list[float]] = {"bare": [], "ingest": []}
    mean_ms: dict[str, list[float]] = {"bare": [], "ingest": []}
    cpu_ms: dict[str, list[float]] = {"bare": [], "ingest": []}

    def side(name: str) -> Callable[[], Awaitable[float]]:
        url, pid = servers[name]

        async def one() -> float:
            script = work / f"wrk-{name}.lua"
            script.write_text(wrk_script(url, secret, WRK_WEBHOOKS, in_flight, threads, f"wrk{name}{next(counter)}",
                                         recorder))
            cpu = cpu_seconds(pid)
            seconds, p, mean = await wrk_blast(url, script, in_flight, threads)
            cpu_ms[name].append((cpu_seconds(pid) - cpu) * 1000 / WRK_WEBHOOKS)
            p99[name].append(p)
            mean_ms[name].append(mean)
            return WRK_WEBHOOKS / seconds
        return one

    bare_rates, ingest_rates = await interleaved(side("bare"), side("ingest"), runs)
    cpu = {name: statistics.median(values) for name, values in cpu_ms.items()}
    ratios = [i / b for i, b in zip(ingest_rates, bare_rates)]
    return [
        ratio_result("webhook ack throughput vs bare, wrk", ratios, ">= 0.5", lambda v: v >= 0.5,
                     f"{WRK_WEBHOOKS} signed webhooks, {in_flight} connections, wrk as the client: ingest "
                     f"{span(ingest_rates, 0)}/s, bare {span(bare_rates, 0)}/s; server CPU per webhook "
                     f"{cpu['ingest']:.2f} ms against {cpu['bare']:.2f} ms", cpu_ms_per_webhook=cpu_ms),
        value_result("webhook ack p99 latency, wrk", p99["ingest"], "ms", "<= 25", lambda v: v <= 25,
                     f"closed loop, {in_flight} in flight, wrk; mean {span(mean_ms['ingest'])} ms; bare p99 "
                     f"{span(p99['bare'])} ms, mean {span(mean_ms['bare'])} ms; {closed_loop_floor(in_flight)}"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--webhooks", type=int, default=2000)
    parser.add_argument("--in-flight", type=int, default=100)
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--serve-baseline", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_baseline:
        serve_baseline(args.serve_baseline, args.work_ms)
        return
    results = asyncio.run(webhook_ack(Path(tempfile.mkdtemp(prefix="bench-webhooks-")), args.webhooks,
                                      args.in_flight, args.runs))
    print(table(results))


if __name__ == "__main__":
    main()
