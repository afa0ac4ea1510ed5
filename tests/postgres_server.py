"""A throwaway PostgreSQL server on loopback, from the Debian packages that setup installs.

``initdb`` into a fresh directory, ``postgres`` on 127.0.0.1 and a free port, trust
authentication for one role; stopped (fast shutdown) and removed at the end. As root,
the server runs as the ``postgres`` user the Debian package creates (PostgreSQL
refuses to run as root).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg

ROLE = "callmesh"


def _bindir() -> Path:
    if os.environ.get("PG_BINDIR"):
        return Path(os.environ["PG_BINDIR"])
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise RuntimeError("PostgreSQL server binaries not found: run scripts/setup.sh --dev "
                       "(installs Debian's postgresql) or set PG_BINDIR")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PostgresServer:
    directory: Path
    port: int
    process: subprocess.Popen

    @property
    def admin_url(self) -> str:
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/postgres"

    def new_database(self) -> str:
        """A fresh empty database; returns its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: smart shutdown; SIGINT would be fast
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def start_postgres(timeout: float = 60.0) -> PostgresServer:
    bindir = _bindir()
    directory = Path(tempfile.mkdtemp(prefix="callmesh-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data = directory / "data"
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", ROLE, "--auth=trust",
                    "--encoding=UTF8", "--no-instructions"], check=True, capture_output=True)
    port = _free_port()
    log = (directory / "postgres.log").open("ab")
    if as_user:
        shutil.chown(directory / "postgres.log", "postgres", "postgres")
    process = subprocess.Popen(
        [*as_user, str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
         "-k", str(directory), "-c", "max_connections=200", "-c", "shared_buffers=64MB"],
        stdout=log, stderr=subprocess.STDOUT)
    server = PostgresServer(directory, port, process)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(server.admin_url, connect_timeout=2):
                return server
        except psycopg.OperationalError:
            if process.poll() is not None or time.monotonic() > deadline:
                tail = (directory / "postgres.log").read_text(errors="replace")[-2000:]
                server.stop()
                raise RuntimeError(f"PostgreSQL did not start:\n{tail}")
            time.sleep(0.2)
