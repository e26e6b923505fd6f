"""A throwaway PostgreSQL server for tests and benchmarks (no Docker, no network).

:func:`start` runs the Debian/Ubuntu packages' ``initdb`` in a temporary directory as an
unprivileged user (``nobody`` when run as root: PostgreSQL refuses to run as root), starts
``postgres`` listening on 127.0.0.1 only on a free port (and a Unix socket inside the
directory), and returns a :class:`Server` whose ``url(db)`` creates databases on demand;
:meth:`Server.stop` stops it and removes the directory. ``python3 -m tests.postgres``
prints a URL and keeps the server until Ctrl-C (for trying things by hand).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.net import free_port

__all__ = ["Server", "find_bin", "new_database", "start"]


def find_bin() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl`` (PATH, then /usr/lib/postgresql/*/bin)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    for d in reversed(dirs):  # the newest major version
        if (Path(d) / "initdb").exists():
            return Path(d)
    return None


@dataclass
class Server:
    """A running server: ``port``, its data directory ``root`` and the server process."""

    port: int
    root: Path
    proc: subprocess.Popen[bytes]
    user: str = "postgres"

    def url(self, database: str | None = None) -> str:
        """``postgresql://`` URL of ``database`` on this server, created if missing
        (``None``: a new database with a unique name)."""
        import psycopg

        database = database or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self._dsn("postgres"), autocommit=True) as c:
            if not c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone():
                c.execute(f'CREATE DATABASE "{database}"')
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def _dsn(self, db: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={db} connect_timeout=5"

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its directory."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # "fast" shutdown
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def new_database(url: str) -> str:
    """Create a database with a unique name on the server of ``url``; returns its URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    name = f"t_{uuid.uuid4().hex[:12]}"
    dsn = (f"host={u.host or '127.0.0.1'} port={u.port or 5432} user={u.username or 'postgres'} "
           f"dbname={u.database or 'postgres'} connect_timeout=5")
    if u.password:
        dsn += f" password={u.password}"
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    return u.set(database=name).render_as_string(hide_password=False)


def start(timeout_s: float = 60.0, *, fsync: bool = True) -> Server:
    """Start a private server (see the module docstring).

    ``fsync=False`` trades durability for speed (tests); benchmarks keep it on.

    Raises:
        RuntimeError: no ``initdb`` found, or the server did not start (its log's tail).
    """
    bindir = find_bin()
    if bindir is None:
        raise RuntimeError("no initdb (install the postgresql package)")
    root = Path(tempfile.mkdtemp(prefix="dse-pg-"))
    data = root / "data"
    preexec = None
    if os.geteuid() == 0:  # postgres refuses root: run as nobody, in a directory it owns
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        os.chmod(root, 0o700)

        def preexec() -> None:  # noqa: F811 - only as root
            os.setgid(nobody.pw_gid)
            os.setgroups([])
            os.setuid(nobody.pw_uid)

    env = {**os.environ, "LC_ALL": "C", "TZ": "UTC"}
    env.pop("PGDATA", None)
    run = subprocess.run(
        [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
         "--no-sync", "-E", "UTF8"],
        capture_output=True, env=env, preexec_fn=preexec, check=False,
    )
    if run.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {run.stderr.decode(errors='replace')[-500:]}")
    port = free_port()
    log = open(root / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1",
         "-k", str(root), "-c", f"fsync={'on' if fsync else 'off'}", "-c", "max_connections=200",
         "-c", "shared_buffers=32MB"],
        stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=preexec,
        start_new_session=True,
    )
    server = Server(port, root, proc)
    deadline = time.monotonic() + timeout_s
    import psycopg

    while True:
        try:
            with psycopg.connect(server._dsn("postgres")):
                return server
        except psycopg.OperationalError:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (root / "server.log").read_bytes()[-800:].decode(errors="replace")
                server.stop()
                raise RuntimeError(f"postgres did not start: {tail}") from None
            time.sleep(0.1)


if __name__ == "__main__":  # pragma: no cover - by hand
    srv = start()
    print(srv.url(sys.argv[1] if len(sys.argv) > 1 else "dse"), flush=True)
    try:
        srv.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
