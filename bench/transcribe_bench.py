"""Transcription: the Transcribe RPC against bare faster-whisper (throughput, first segment, memory).

The service runs as its own process (as in production) on 127.0.0.1; the
baseline calls faster-whisper in-process with the same model and the same
decoding settings (the service's own defaults, read from the same environment).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.bare_whisper import bare_whisper, transcribe_direct
from bench.common import Result, interleaved, ratio_result, span, value_result
from callcenter.v1 import transcribe_pb2, transcribe_pb2_grpc
from callmesh.mesh import Mesh, new_mesh
from services.common.grpc_server import client_channel
from services.transcribe.config import EngineSettings

CHUNK = 256 * 1024


@dataclass
class RpcRun:
    total: float  # first audio byte sent → last segment received
    first_segment: float  # first audio byte sent → first segment received
    segments: int


async def transcribe_rpc(address: str, path: Path) -> RpcRun:
    data = path.read_bytes()
    sent_at: list[float] = []

    async def requests():
        yield transcribe_pb2.TranscribeRequest(config=transcribe_pb2.TranscriptionConfig(call_id="bench"))
        for i in range(0, len(data), CHUNK):
            if not sent_at:
                sent_at.append(time.perf_counter())
            yield transcribe_pb2.TranscribeRequest(audio=data[i:i + CHUNK])

    first = None
    segments = 0
    async with client_channel(address) as channel:
        async for reply in transcribe_pb2_grpc.TranscriptionServiceStub(channel).Transcribe(requests(), timeout=7200):
            if reply.WhichOneof("response") == "segment":
                segments += 1
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    return RpcRun(end - sent_at[0], (first or end) - sent_at[0], segments)


# Measured beside the defaults: the engine as faster-whisper runs it (every window padded to 30 s and
# read whole, no short first piece), so that the RPC's own cost shows alone.
AS_FASTER_WHISPER = {"WHISPER_FIT_CONTEXT": "0", "WHISPER_FIRST_PIECE_SECONDS": "0"}


def start_transcribe(work: Path, whisper: Path, **env: str) -> Mesh:
    mesh = new_mesh({"TRANSCRIBE_LISTEN": "127.0.0.1:0", "WHISPER_MODEL": str(whisper), "LOG_LEVEL": "WARNING", **env},
                    work)
    mesh.start_service("transcribe", timeout=120)
    return mesh


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


BARE_SCRIPT = """
import json, sys
from pathlib import Path
from bench.bare_whisper import bare_whisper, transcribe_direct
from services.transcribe.config import EngineSettings
settings = EngineSettings.from_env()
_, n = transcribe_direct(bare_whisper(settings), settings, Path(sys.argv[1]))
hwm = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
print(json.dumps({"segments": n, "peak_mib": int(hwm.split()[1]) / 1024}))
"""


async def overhead_and_first_segment(call: Path, work: Path, whisper: Path, runs: int) -> list[Result]:
    """The service with its defaults against bare faster-whisper, interleaved; then, interleaved with
    bare faster-whisper again, the service decoding as faster-whisper does (``AS_FASTER_WHISPER``)."""
    settings = EngineSettings.from_env()
    bare = bare_whisper(settings)

    async def direct() -> float:
        seconds, _ = await asyncio.to_thread(transcribe_direct, bare, settings, call)
        return seconds

    async def measure(mesh: Mesh) -> tuple[list[RpcRun], list[float], list[float]]:
        address = mesh.services["transcribe"].address
        rpc_runs: list[RpcRun] = []

        async def rpc() -> float:
            run = await transcribe_rpc(address, call)
            rpc_runs.append(run)
            return run.total

        await rpc()  # warm-up of both (first decode pays for lazy initialisation)
        await direct()
        rpc_runs.clear()
        rpc_times, direct_times = await interleaved(rpc, direct, runs)
        return rpc_runs, rpc_times, direct_times

    results: list[Result] = []
    for label, env in (("", {}), (", windows as faster-whisper reads them", AS_FASTER_WHISPER)):
        mesh = await asyncio.to_thread(start_transcribe, work / f"rpc{len(results)}", whisper, **env)
        try:
            rpc_runs, rpc_times, direct_times = await measure(mesh)
        finally:
            await asyncio.to_thread(mesh.stop)
        ratios = [d / r for d, r in zip(direct_times, rpc_times)]
        fractions = [r.first_segment / r.total for r in rpc_runs]
        results += [
            ratio_result(f"transcribe RPC vs direct throughput{label}", ratios, ">= 0.95", lambda v: v >= 0.95,
                         f"60 s call: RPC {span(rpc_times)} s, direct "
                         f"{span(direct_times)} s, {rpc_runs[0].segments} segments"),
            # the goal is the product's: the decode as faster-whisper does it is reported beside it
            value_result(f"time to first segment / decode{label}", fractions, "fraction",
                         "report" if env else "<= 0.15", None if env else (lambda v: v <= 0.15),
                         f"first segment after {min(r.first_segment for r in rpc_runs):.1f}-"
                         f"{max(r.first_segment for r in rpc_runs):.1f} s"),
        ]
    return results


async def memory(call: Path, work: Path, whisper: Path, runs: int) -> list[Result]:
    """Peak RSS of a fresh transcribe service after one call vs a fresh bare faster-whisper process."""
    service_peaks: list[float] = []
    bare_peaks: list[float] = []

    async def service() -> float:
        mesh = await asyncio.to_thread(start_transcribe, work / "mem", whisper)
        try:
            await transcribe_rpc(mesh.services["transcribe"].address, call)
            peak = peak_rss_mib(mesh.services["transcribe"].process.pid)
        finally:
            await asyncio.to_thread(mesh.stop)
        service_peaks.append(peak)
        return peak

    async def bare() -> float:
        out = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", BARE_SCRIPT, str(call)],
                                      capture_output=True, text=True, check=True)
        peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
        bare_peaks.append(peak)
        return peak

    await interleaved(service, bare, runs)
    ratios = [s / b for s, b in zip(service_peaks, bare_peaks)]
    return [ratio_result("transcribe peak RSS vs bare", ratios, "<= 1.3", lambda v: v <= 1.3,
                         f"service {span(service_peaks, 0)} MiB, "
                         f"bare {span(bare_peaks, 0)} MiB")]


@dataclass
class ColdRun:
    """One fresh transcribe service: start to SERVING, then the same call twice."""

    start: float  # process started → listening (the model loaded, the warm-up done if on)
    first: float  # the first call, first audio byte sent → last segment received
    second: float  # the same call again

    @property
    def extra(self) -> float:
        """What the first call costs beyond the second."""
        return self.first - self.second


# A fresh container: each service starts with CUDA's kernel cache off (no effect on the CPU), and logs
# at INFO, which says how long its warm-up took.
FRESH = {"CUDA_CACHE_DISABLE": "1", "LOG_LEVEL": "INFO"}


async def cold_run(call: Path, work: Path, whisper: Path, **env: str) -> ColdRun:
    """Start a service, send it the call twice, stop it."""
    started = time.perf_counter()
    mesh = await asyncio.to_thread(start_transcribe, work, whisper, **env)
    ready = time.perf_counter() - started
    try:
        address = mesh.services["transcribe"].address
        first = await transcribe_rpc(address, call)
        second = await transcribe_rpc(address, call)
    finally:
        await asyncio.to_thread(mesh.stop)
    return ColdRun(ready, first.total, second.total)


def cold_note(runs: list[ColdRun]) -> str:
    return (f"serving after {span([r.start for r in runs])} s, 60 s call first {span([r.first for r in runs])} s, "
            f"then {span([r.second for r in runs])} s")


async def cold_start(call: Path, work: Path, whisper: Path, runs: int) -> list[Result]:
    """A fresh service's first call against its second: with the warm-up at start (the default)
    and without it (``WHISPER_WARM_UP=0``), interleaved, each run in a new process."""
    runs_by: dict[str, list[ColdRun]] = {"1": [], "0": []}

    def fresh(warm_up: str):
        async def one() -> float:
            run = await cold_run(call, work / f"cold-{warm_up}", whisper, WHISPER_WARM_UP=warm_up, **FRESH)
            runs_by[warm_up].append(run)
            return run.first
        return one

    await interleaved(fresh("1"), fresh("0"), runs)
    results = []
    for warm_up, label, goal, met in (("1", "", "<= 1", lambda v: v <= 1.0),
                                      ("0", ", no warm-up", "report", None)):
        done = runs_by[warm_up]
        results.append(value_result(
            f"transcribe first call's extra time{label}", [r.extra for r in done], "s", goal, met,
            f"fresh service: {cold_note(done)}",
            start_seconds=[round(r.start, 2) for r in done],
            first_seconds=[round(r.first, 2) for r in done],
            second_seconds=[round(r.second, 2) for r in done]))
    return results


async def restart(call: Path, work: Path, whisper: Path, runs: int) -> list[Result]:
    """A service started again on one data directory, which keeps the kernels CUDA compiled at its
    first start (``keep_compiled_kernels``): the time to serving of each restart."""
    kept = {"CALLMESH_DATA_DIR": str(work / "restart-data"), "LOG_LEVEL": "INFO"}
    first_start = await cold_run(call, work / "restart", whisper, **kept)
    restarts = [await cold_run(call, work / "restart", whisper, **kept) for _ in range(runs)]
    return [value_result(
        "transcribe restart: seconds to serving", [r.start for r in restarts], "s", "report", None,
        f"the data directory's first start {first_start.start:.1f} s; restarts: {cold_note(restarts)}",
        first_start_seconds=round(first_start.start, 2),
        first_seconds=[round(r.first, 2) for r in restarts],
        second_seconds=[round(r.second, 2) for r in restarts])]


@dataclass
class LongRun:
    """One long call through a fresh service: its RSS every 2 s, and the decode."""

    samples: list[tuple[float, float]]  # (seconds since the first byte, RSS MiB)
    total: float
    segments: int

    def growth(self) -> float:
        """Median RSS of the last quarter of the decode against that of the second quarter."""
        n = len(self.samples)
        early = [rss for _, rss in self.samples[n // 4: n // 2]] or [self.samples[0][1]]
        late = [rss for _, rss in self.samples[3 * n // 4:]] or [self.samples[-1][1]]
        return statistics.median(late) / statistics.median(early)

    def at_minutes(self, minutes: int) -> dict[int, float]:
        """RSS when 5, 30 and 60 minutes of audio were reached (taken as that fraction of the decode time)."""
        total = self.samples[-1][0]
        return {m: min(self.samples, key=lambda s: abs(s[0] - total * m / minutes))[1]
                for m in (5, 30, 60) if m <= minutes}


async def long_call_rss(long_call: Path, work: Path, whisper: Path, minutes: int, runs: int) -> list[Result]:
    """RSS of the service sampled every 2 s through a long call, ``runs`` times (each in a service process
    of its own, started for it): it should stay flat once decoding runs."""
    done_runs: list[LongRun] = []
    for i in range(runs):
        mesh = await asyncio.to_thread(start_transcribe, work / f"long-{i}", whisper)
        pid = mesh.services["transcribe"].process.pid
        samples: list[tuple[float, float]] = []
        done = threading.Event()

        def sample() -> None:
            start = time.perf_counter()
            while not done.wait(2.0):
                samples.append((time.perf_counter() - start, rss_mib(pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            run = await transcribe_rpc(mesh.services["transcribe"].address, long_call)
        finally:
            done.set()
            sampler.join()
            await asyncio.to_thread(mesh.stop)
        done_runs.append(LongRun(samples, run.total, run.segments))
    return [rss_result(done_runs, minutes)]


def rss_result(runs: list[LongRun], minutes: int) -> Result:
    """Flat: each run's median RSS of the last quarter of the decode against that of the second quarter.
    Medians, because each piece of a long call briefly adds its features (a few seconds' spike);
    the peaks are reported beside them, with RSS when 5, 30 and 60 minutes of audio were reached.
    The samples kept are those of the run with the median growth."""
    rss = [r for run in runs for _, r in run.samples]
    peaks = [max(r for _, r in run.samples) for run in runs]
    middle = sorted(runs, key=LongRun.growth)[len(runs) // 2]
    at = {m: [run.at_minutes(minutes)[m] for run in runs] for m in middle.at_minutes(minutes)}
    return value_result(f"transcribe RSS growth, {minutes} min call", [run.growth() for run in runs], "x",
                        "<= 1.05 (flat)", lambda v: v <= 1.05,
                        f"RSS {span(rss, 0)} MiB over {len(runs)} runs of "
                        f"{span([r.total for r in runs], 0)} s, "
                        f"{middle.segments} segments; "
                        + "".join(f"at {m} min {span(v, 0)} MiB, " for m, v in at.items())
                        + f"peak {span(peaks, 0)} MiB",
                        peak_mib=[round(p, 1) for p in peaks],
                        rss_at_minutes={m: [round(x, 1) for x in v] for m, v in at.items()},
                        samples=[[round(t, 1), round(r, 1)] for t, r in middle.samples])
