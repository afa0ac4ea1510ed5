"""Start the four services as separate local processes, the embedded one-machine way.

Each service listens on port 0 and reports the address it bound through
``CALLMESH_READY_FILE``; ingest starts last, pointed at the other three. Used
by the demo and the end-to-end tests; stopping sends SIGTERM so each drains.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from callmesh.standins import new_webhook_secret

log = logging.getLogger(__name__)

GRPC_SERVICES = (("transcribe", "TRANSCRIBE_LISTEN", "TRANSCRIBE_ADDR"),
                 ("analyze", "ANALYZE_LISTEN", "ANALYZE_ADDR"),
                 ("crm", "CRM_SYNC_LISTEN", "CRM_SYNC_ADDR"))


class MeshError(RuntimeError):
    """A service did not start; the message carries the end of its log."""


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen
    address: str
    log_path: Path
    metrics_url: str = ""
    module: str = ""  # the service it runs (``name`` may be a replica's, such as "crm-b")


@dataclass
class Mesh:
    """The running services; ``ingest_url`` is where the recorder posts."""

    workdir: Path
    env: dict[str, str]
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    @property
    def ingest_url(self) -> str:
        return f"http://{self.services['ingest'].address}"

    @property
    def webhook_secret(self) -> str | None:
        """The newest of ``WEBHOOK_SECRETS``: what the recorder signs its webhooks with."""
        secrets = [s.strip() for s in self.env.get("WEBHOOK_SECRETS", "").split(",") if s.strip()]
        return secrets[0] if secrets else None

    def start_service(self, name: str, extra_env: dict[str, str] | None = None, timeout: float = 180.0,
                      module: str | None = None) -> ServiceProcess:
        """Start ``services.<module>`` (default: ``name``) and wait until it says where it listens."""
        module = module or name
        self.workdir.mkdir(parents=True, exist_ok=True)
        ready = self.workdir / f"{name}.ready"
        ready.unlink(missing_ok=True)
        log_path = self.workdir / f"{name}.log"
        env = {**self.env, **(extra_env or {}), "CALLMESH_READY_FILE": str(ready)}
        out: IO = log_path.open("ab")
        process = subprocess.Popen([sys.executable, "-m", f"services.{module}"], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if process.poll() is not None:
                raise MeshError(f"{name} exited with code {process.returncode}:\n" + _tail(log_path))
            if time.monotonic() > deadline:
                process.kill()
                raise MeshError(f"{name} did not start within {timeout:.0f} s:\n" + _tail(log_path))
            time.sleep(0.05)
        said = json.loads(ready.read_text())
        svc = ServiceProcess(name, process, said["address"], log_path, said.get("metrics", ""), module)
        self.services[name] = svc
        log.info("%-10s %s (pid %d)", name, svc.address, process.pid)
        return svc

    def start(self, timeout: float = 300.0) -> "Mesh":
        for name, listen_var, _ in GRPC_SERVICES:
            self.env.setdefault(listen_var, "127.0.0.1:0")
            self.env.setdefault(listen_var.replace("_LISTEN", "_METRICS_LISTEN"), "127.0.0.1:0")
        # Start the three gRPC services at once; they load models in parallel.
        for name, _, addr_var in GRPC_SERVICES:
            self.start_service(name, timeout=timeout)
            self.env[addr_var] = self.services[name].address
        self.env.setdefault("INGEST_PORT", "0")
        self.start_service("ingest", timeout=timeout)
        return self

    def stop_service(self, name: str, timeout: float = 30.0) -> int | None:
        svc = self.services.pop(name, None)
        if svc is None:
            return None
        if svc.process.poll() is None:
            svc.process.send_signal(signal.SIGTERM)
            try:
                svc.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                svc.process.kill()
                svc.process.wait()
        return svc.process.returncode

    def restart_service(self, name: str, *, kill: bool = False, timeout: float = 180.0) -> ServiceProcess:
        """Stop ``name`` (SIGKILL with ``kill``, else SIGTERM and drain) and start it again on the same address."""
        svc = self.services[name]
        if kill:
            svc.process.kill()
            svc.process.wait()
            self.services.pop(name)
        else:
            self.stop_service(name)
        host, port = svc.address.rsplit(":", 1)
        if name == "ingest":
            same = {"INGEST_HOST": host, "INGEST_PORT": port}
        else:
            same = {listen: svc.address for service, listen, _ in GRPC_SERVICES if service == name}
        return self.start_service(name, same, timeout)

    def stop(self) -> None:
        """Drain in the order of the path a call takes: ingest first, transcribe last."""
        order = ("ingest", "crm", "analyze", "transcribe")
        for name in sorted(self.services, key=lambda n: order.index(self.services[n].module)):
            self.stop_service(name)

    def __enter__(self) -> "Mesh":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def new_mesh(env: dict[str, str] | None = None, workdir: Path | None = None) -> Mesh:
    """A mesh with the current environment plus ``env``; webhooks are signed with a fresh secret unless
    ``env`` names ``WEBHOOK_SECRETS`` (or ``WEBHOOK_ALLOW_UNSIGNED``)."""
    base = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
    if not base.get("WEBHOOK_SECRETS") and base.get("WEBHOOK_ALLOW_UNSIGNED", "") in ("", "0"):
        base["WEBHOOK_SECRETS"] = new_webhook_secret()
    return Mesh(workdir or Path(tempfile.mkdtemp(prefix="callmesh-")), base)
