"""A throwaway PostgreSQL server for the tests that run the node on it.

:func:`postgres_server` makes one cluster for a test run (``initdb`` into a
temporary folder, trust authentication, fsync off) and starts it listening on
a Unix socket in that folder only: no TCP port is opened.  Each test gets a
database of its own (:meth:`Postgres.new_database`), whose URL is what
``database.url`` takes.  The cluster is stopped (``pg_ctl stop -m fast``, then
its postmaster's PID is killed if that did not do it) and removed when the
fixture ends, tests failed or not.

The server's programs are the newest ``/usr/lib/postgresql/N/bin`` (Debian's
``postgresql`` package), else ``initdb`` and ``pg_ctl`` on PATH.  Tests name
them in ``@pytest.mark.tools(*POSTGRES_TOOLS)``: a CI run (``CI=true``)
without them fails, a checkout elsewhere skips.  As root (CI), the cluster is
made and run by the ``postgres`` system user, which PostgreSQL requires.

This module is imported by the processes :func:`open_together` spawns, so it
imports nothing heavier than ``ichnode.db``.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.peers import require_tool

PG_USER = "postgres"
START_TIMEOUT_S = 60


def _bin_dir() -> Path | None:
    """The newest Debian-style server folder that holds initdb and pg_ctl."""

    def version(folder: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", folder.parent.name))

    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb") if (p.parent / "pg_ctl").exists()]
    return max(found, key=version) if found else None


# Absolute paths where Debian keeps them (require_tool takes a path as it is);
# the bare names, looked for on PATH, elsewhere.
_BIN = _bin_dir()
POSTGRES_TOOLS = tuple(str(_BIN / name) if _BIN else name for name in ("initdb", "pg_ctl"))


class Postgres:
    """A running throwaway cluster; :meth:`new_database` gives each test its own database."""

    def __init__(self, root: Path, initdb: str, pg_ctl: str) -> None:
        self.root = root
        self.data = root / "data"
        self.socket_dir = root / "socket"
        self.log_path = root / "server.log"
        self.initdb = initdb
        self.pg_ctl = pg_ctl
        self.pid: int | None = None
        self._count = 0

    def _run(self, argv: Sequence[str], timeout: float = START_TIMEOUT_S) -> None:
        # PostgreSQL refuses to run as root: its own system user runs it.
        prefix = ["runuser", "-u", PG_USER, "--"] if os.geteuid() == 0 else []
        out = subprocess.run(
            prefix + list(argv), cwd=self.root, capture_output=True, text=True, timeout=timeout, check=False
        )
        if out.returncode != 0:
            output = out.stdout + out.stderr + self._tail()
            raise RuntimeError(f"{' '.join(argv)} exited with {out.returncode}:\n{output}")

    def _tail(self) -> str:
        if not self.log_path.exists():
            return ""
        return "\nserver log:\n" + "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])

    def start(self) -> Postgres:
        self.socket_dir.mkdir()
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam(PG_USER)
            except KeyError:
                raise RuntimeError(f"as root, the server runs as the {PG_USER!r} system user: there is none") from None
            for path in (self.root, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._run([self.initdb, "-D", str(self.data), "--auth=trust", "-U", PG_USER, "-E", "UTF8", "--no-sync"])
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
            # The Unix socket in our folder is the only way in; a throwaway cluster needs no fsync.
            conf.write(f"listen_addresses = ''\nunix_socket_directories = '{self.socket_dir}'\n")
            conf.write("fsync = off\nfull_page_writes = off\nsynchronous_commit = off\n")
        timeout = str(START_TIMEOUT_S)
        self._run([self.pg_ctl, "start", "-w", "-t", timeout, "-D", str(self.data), "-l", str(self.log_path)])
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        return self

    def stop(self) -> None:
        if self.pid is None:
            return
        try:
            self._run([self.pg_ctl, "stop", "-w", "-m", "fast", "-D", str(self.data)], timeout=30)
        except (RuntimeError, subprocess.TimeoutExpired):
            # SIGQUIT is PostgreSQL's immediate shutdown; its children follow the postmaster.
            _kill(self.pid, signal.SIGQUIT)
        self.pid = None

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{PG_USER}@/{database}?host={self.socket_dir}"

    def new_database(self, hint: str = "test") -> str:
        """A new, empty database (named after ``hint``, a test's name); its SQLAlchemy URL."""
        import psycopg

        self._count += 1
        name = f"t{self._count}_" + re.sub(r"[^a-z0-9]+", "_", hint.lower())[:40]
        with psycopg.connect(host=str(self.socket_dir), user=PG_USER, dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def postgres_server() -> Iterator[Postgres]:
    """Body of a session fixture: ``yield from postgres_server()`` yields a started
    :class:`Postgres` and stops and removes it afterwards."""
    initdb, pg_ctl = (require_tool(tool) for tool in POSTGRES_TOOLS)
    # Not under pytest's own temporary folder: that one is private to root, the server's user cannot enter it.
    root = Path(tempfile.mkdtemp(prefix="ichnode-pg-"))
    server = Postgres(root, initdb, pg_ctl)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- processes opening one database at once --------------------------------------
def _open_at_once(index: int, urls: Sequence[str], barrier: Any, results: Any) -> None:
    """Body of each spawned process: for each URL, wait until every process is
    ready, then open the node's database; report the installation id or why not."""
    from ichnode import db

    for url in urls:
        barrier.wait(timeout=120)
        try:
            engine = db.open_node_database(url)
            outcome = ("ok", db.installation(db.session_factory(engine)))
            engine.dispose()
        except Exception as exc:  # reported to the test, which shows it
            outcome = ("failed", f"{type(exc).__name__}: {exc}")
        results.put((url, index, *outcome))


def open_together(urls: Sequence[str], processes: int) -> dict[str, list[tuple[str, str]]]:
    """``processes`` processes (spawned, as separately started nodes are) each
    open every database in ``urls`` at the same instant; per URL, every
    process's ``("ok", installation id)`` or ``("failed", reason)``."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes)
    results = context.Queue()
    workers = [
        context.Process(target=_open_at_once, args=(index, list(urls), barrier, results)) for index in range(processes)
    ]
    for worker in workers:
        worker.start()
    try:
        found: dict[str, list[tuple[str, str]]] = {url: [] for url in urls}
        for _ in range(len(urls) * processes):
            url, _index, state, detail = results.get(timeout=180)
            found[url].append((state, detail))
        return found
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
                worker.join()
