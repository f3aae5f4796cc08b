"""Real DICOM peers for tests and benchmarks: Orthanc, DCMTK storescp, ichnode itself.

Each launcher is a context manager that starts a real process on free
localhost ports, waits (with a deadline, never a fixed sleep) until it answers,
and stops it by PID on exit (SIGTERM, wait, then SIGKILL).  Logs go to a file in
the caller's ``workdir`` and their tail is quoted when a start fails.

Network exposure
----------------
ichnode is told to listen on 127.0.0.1.  Orthanc and DCMTK ``storescp`` cannot
be told so: they bind every interface.  Orthanc is therefore configured with
``RemoteAccessAllowed: false`` (its REST API answers only localhost), and
:class:`StoreSCP` is meant for benchmarks that run inside a private network
namespace (``unshare -n`` with ``lo`` up, as ``benchmarks/ingest`` does), or
for callers that accept a short-lived listener on all interfaces.

Debian's DCMTK (and Orthanc, which uses it) stall about 45 ms per image
(Nagle + delayed ACK) unless ``TCP_NODELAY=1`` is in their environment; every
launcher here sets it.

pytest is imported lazily so that benchmarks can use this module without it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

REPO_ROOT = Path(__file__).resolve().parent.parent

# Extra places to look for tools that live in sbin (Orthanc on Debian).
_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


class ToolMissing(RuntimeError):
    """A required external program is not installed (raised outside pytest)."""


# -- small helpers -----------------------------------------------------------
def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_tool(name: str) -> str:
    """Absolute path of the program ``name``.

    pynetdicom installs Python apps named like DCMTK's (storescu, echoscu,
    storescp) into the virtual environment's bin; those never count.
    When it is missing: under pytest, ``pytest.fail`` if ``$CI == "true"`` (a CI
    image must have its peers) and ``pytest.skip`` otherwise; outside pytest
    (benchmarks), :class:`ToolMissing` (a ``RuntimeError``).
    """
    venv_bin = (Path(sys.prefix) / "bin").resolve()
    search = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p] + list(_SBIN_DIRS)
    for folder in search:
        if Path(folder).resolve() == venv_bin:
            continue
        path = shutil.which(name, path=folder)
        if path is not None:
            return os.path.abspath(path)
    message = f"{name} is not installed (not on PATH nor in {', '.join(_SBIN_DIRS)})"
    if "pytest" in sys.modules:
        import pytest

        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    raise ToolMissing(message)


def peer_env(**extra: str) -> dict[str, str]:
    """The environment for a peer process: ours plus ``TCP_NODELAY=1`` (DCMTK)."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    env.update(extra)
    return env


def dicom_echo(host: str, port: int, called_aet: str, *, calling_aet: str = "PEERS_ECHO", timeout: float = 5.0) -> bool:
    """One C-ECHO with pynetdicom; True when the peer answers Success."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(Verification)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and getattr(status, "Status", None) == 0x0000
    finally:
        assoc.release()


def _tcp_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _stop_process(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float, *, group: bool = False) -> int | None:
    """Signal ``proc``, wait up to ``timeout``, then SIGKILL it; returns its exit code.

    With ``group`` the process was started in its own session and its whole
    process group (our children only, e.g. forked storescp workers) is killed
    at the end as well.
    """
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if group:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return proc.returncode


class _Process:
    """Common lifecycle of a launched peer: a Popen, a log file, start/stop."""

    name = "peer"

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._group = False

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} is not started"
        return self.proc.pid

    def _popen(self, argv: list[str], *, env: Mapping[str, str], cwd: Path | None = None, new_session: bool = False) -> None:
        self._log = open(self.log_path, "ab")
        self._group = new_session
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=str(cwd or self.workdir),
            start_new_session=new_session,
        )

    def _wait_ready(self, check: Any, timeout: float, what: str) -> None:
        try:
            self._poll_ready(check, timeout, what)
        except BaseException:
            # Never leave a half-started peer behind (failed start, Ctrl-C).
            self.stop_process(signal.SIGKILL, group=self._group)
            raise

    def _poll_ready(self, check: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self._close_log()
                raise RuntimeError(f"{self.name} exited with {code} before {what}; log:\n{_tail(self.log_path)}")
            try:
                if check():
                    return
            except Exception:  # not up yet (connection refused, HTTP error, ...)
                pass
            if time.monotonic() > deadline:
                self.stop_process(signal.SIGKILL, group=self._group)
                raise RuntimeError(f"{self.name} did not {what} within {timeout:.0f} s; log:\n{_tail(self.log_path)}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    def stop_process(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S, *, group: bool = False) -> int | None:
        try:
            return _stop_process(self.proc, sig, timeout, group=group)
        finally:
            self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 30) -> str:
        return _tail(self.log_path, lines)

    # Each peer starts (and is ready) and stops in its own way.
    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> int | None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- Orthanc -----------------------------------------------------------------
class Orthanc(_Process):
    """An Orthanc server with a throwaway configuration and storage under ``workdir``.

    Parameters
    ----------
    workdir
        Folder for the configuration, storage, index and log (created).
    aet
        Orthanc's own AE title.
    modalities
        ``name -> (AET, host, port)`` peers Orthanc may send to
        (``POST /modalities/{name}/store``), e.g. ichnode.
    dicom_port, http_port
        Defaults: free ports, chosen now (so other peers can be configured
        with them before this one starts).
    config
        Extra top-level keys merged over the generated configuration.
    start_timeout
        Seconds to wait for ``/system`` and the DICOM port.

    Its REST API answers localhost only (``RemoteAccessAllowed: false``), without
    authentication; its DICOM port binds all interfaces (Orthanc has no listen
    address option) and accepts C-ECHO and C-STORE from any AE.  Orthanc 1.10
    has no ``DicomTcpNoDelay`` option: ``TCP_NODELAY=1`` in its environment does
    that for DCMTK's sockets.  ``SyncStorageArea`` stays true (fsync on write, as
    ichnode does).
    """

    name = "orthanc"

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        dicom_port: int | None = None,
        http_port: int | None = None,
        config: Mapping[str, Any] | None = None,
        start_timeout: float = START_TIMEOUT_S,
    ) -> None:
        super().__init__(workdir)
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.config_path = self.workdir / "orthanc.json"
        self.extra_config = dict(config or {})
        self.start_timeout = start_timeout
        # Never route localhost REST calls through an http_proxy from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def make_config(self) -> dict[str, Any]:
        storage = self.workdir / "storage"
        config: dict[str, Any] = {
            "Name": f"test-{self.aet}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "SyncStorageArea": True,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpTimeout": 60,
            "TcpNoDelay": True,  # HTTP sockets; DICOM ones get TCP_NODELAY=1 from the environment
            "KeepAlive": True,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomScuTimeout": 30,
            "DicomScpTimeout": 30,
            "DicomModalities": {name: [aet, host, port] for name, (aet, host, port) in self.modalities.items()},
            "UnknownSopClassAccepted": True,
            "SaveJobs": False,
            "JobsHistorySize": 100,
            "StableAge": 60,
        }
        config.update(self.extra_config)
        return config

    def start(self) -> Orthanc:
        binary = require_tool("Orthanc")
        self.config_path.write_text(json.dumps(self.make_config(), indent=2))
        self._popen([binary, "--no-jobs", str(self.config_path)], env=peer_env())
        self._wait_ready(lambda: self._system_ok() and _tcp_open(self.dicom_port), self.start_timeout, "answer /system")
        return self

    def _system_ok(self) -> bool:
        with self._opener.open(self.url + "/system", timeout=2) as response:
            return response.status == 200

    def rest(self, method: str, path: str, body: Any = None, *, timeout: float = 60.0) -> Any:
        """Call the REST API; JSON answers are decoded, others returned as bytes.

        ``body``: bytes (sent as is, ``application/dicom``), str (as text), or
        anything JSON-serialisable.  An HTTP error raises ``RuntimeError`` with
        Orthanc's explanation.
        """
        data: bytes | None
        headers = {"Accept": "application/json"}
        if body is None:
            data = None
        elif isinstance(body, bytes | bytearray):
            data = bytes(body)
            headers["Content-Type"] = "application/dicom"
        elif isinstance(body, str):
            data = body.encode()
            headers["Content-Type"] = "text/plain"
        else:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if not path.startswith("/"):
            path = "/" + path
        request = urllib.request.Request(self.url + path, data=data, method=method.upper(), headers=headers)
        try:
            with self._opener.open(request, timeout=timeout) as response:
                payload = response.read()
                content_type = response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:2000]
            raise RuntimeError(f"Orthanc {method.upper()} {path} -> HTTP {exc.code}: {detail}") from None
        if "json" in content_type:
            return json.loads(payload) if payload else None
        return payload

    def upload(self, path: Path) -> str:
        """Store one DICOM file (``POST /instances``); returns its Orthanc instance id."""
        answer = self.rest("POST", "/instances", Path(path).read_bytes())
        return str(answer["ID"])

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare (or replace) a DICOM modality at run time (``PUT /modalities/{name}``)."""
        self.rest("PUT", f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})
        self.modalities[name] = (aet, host, port)

    def count_instances(self) -> int:
        return int(self.rest("GET", "/statistics")["CountInstances"])

    def stop(self) -> int | None:
        return self.stop_process(signal.SIGTERM)


# -- DCMTK storescp ----------------------------------------------------------
class StoreSCP(_Process):
    """DCMTK ``storescp`` writing every received instance into ``output_dir``.

    **It listens on all interfaces** (DCMTK has no listen-address option).
    Use it inside a private network namespace (``unshare -n``, ``ip link set lo
    up``), as ``benchmarks/ingest`` does, or accept a short-lived open port.

    With ``fork`` it serves each association in a forked child (concurrent
    associations); the process runs in its own session so :meth:`stop` also
    kills any such child still running.  ``bit_preserving`` (``+B``) writes
    the received bytes without re-encoding them.  Files are not fsynced.
    """

    name = "storescp"

    def __init__(
        self,
        workdir: Path,
        *,
        output_dir: Path | None = None,
        aet: str = "STORESCP",
        port: int | None = None,
        fork: bool = False,
        bit_preserving: bool = False,
        start_timeout: float = START_TIMEOUT_S,
    ) -> None:
        super().__init__(workdir)
        self.output_dir = Path(output_dir) if output_dir is not None else self.workdir / "received"
        self.aet = aet
        self.port = port or free_port()
        self.fork = fork
        self.bit_preserving = bit_preserving
        self.start_timeout = start_timeout

    def start(self) -> StoreSCP:
        binary = require_tool("storescp")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        argv = [binary, "-aet", self.aet, "-od", str(self.output_dir), "-pdu", "131072"]
        if self.fork:
            argv.append("--fork")
        if self.bit_preserving:
            argv.append("+B")
        argv.append(str(self.port))
        self._popen(argv, env=peer_env(), new_session=True)
        self._wait_ready(lambda: dicom_echo("127.0.0.1", self.port, self.aet, timeout=2), self.start_timeout, "answer C-ECHO")
        return self

    def count_files(self) -> int:
        return sum(1 for path in self.output_dir.rglob("*") if path.is_file())

    def stop(self) -> int | None:
        return self.stop_process(signal.SIGTERM, group=True)


# -- ichnode -----------------------------------------------------------------
def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class IchnodeProcess(_Process):
    """``python -m ichnode.cli serve`` as a subprocess with a config under ``workdir``.

    Parameters
    ----------
    workdir
        Folder for ``ichnode.yaml``, ``spool/``, ``ichnode.db`` and ``ichnode.log``.
    port
        Default: a free port, chosen now.
    ae_title
        The node's AE title (the called AE title peers must use).
    stable_seconds
        ``series.stable_seconds``.
    fsync
        ``storage.fsync``.
    config
        Extra configuration merged (deeply) over the generated one, e.g.
        ``{"reports": {"destinations": [{"ae_title": "ORTHANC", "host":
        "127.0.0.1", "port": orthanc.dicom_port}]}}``.
    components
        ``serve --components`` (e.g. ``["receiver"]``); default: the CLI's
        default (every stage, which loads the model).
    python
        Interpreter to run (default: this one).
    env
        Extra environment variables.
    start_timeout
        Seconds to wait for a successful C-ECHO.
    """

    name = "ichnode"

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        ae_title: str = "ICHNODE",
        stable_seconds: float = 1.0,
        fsync: bool = True,
        log_level: str = "INFO",
        config: Mapping[str, Any] | None = None,
        components: Sequence[str] | None = None,
        python: str | None = None,
        env: Mapping[str, str] | None = None,
        start_timeout: float = START_TIMEOUT_S,
    ) -> None:
        super().__init__(workdir)
        self.components = list(components) if components is not None else None
        self.port = port or free_port()
        self.ae_title = ae_title
        self.host = "127.0.0.1"
        self.spool_dir = self.workdir / "spool"
        self.db_path = self.workdir / "ichnode.db"
        self.config_path = self.workdir / "ichnode.yaml"
        self.python = python or sys.executable
        self.extra_env = dict(env or {})
        self.start_timeout = start_timeout
        base: dict[str, Any] = {
            "node": {"ae_title": ae_title, "host": self.host, "port": self.port},
            "access": {"allow": [{"ae_title": "*", "host": "127.0.0.1"}]},
            "storage": {"spool_dir": str(self.spool_dir), "fsync": fsync},
            "database": {"url": f"sqlite:///{self.db_path}"},
            "series": {"stable_seconds": stable_seconds},
            "logging": {"level": log_level},
        }
        self.config = deep_merge(base, config or {})

    def start(self) -> IchnodeProcess:
        import yaml

        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        env = peer_env(**self.extra_env)
        # The checkout under test, whether or not it is installed in this interpreter.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        argv = [self.python, "-m", "ichnode.cli", "serve", "--config", str(self.config_path)]
        if self.components is not None:
            argv += ["--components", ",".join(self.components)]
        self._popen(argv, env=env)
        self._wait_ready(lambda: dicom_echo(self.host, self.port, self.ae_title, timeout=2), self.start_timeout, "answer C-ECHO")
        return self

    def count_instances(self) -> int:
        """Rows in the ``instance`` table (read-only connection)."""
        with sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM instance").fetchone()[0])

    def count_spool_files(self) -> int:
        return sum(1 for _ in (self.spool_dir / "instances").rglob("*.dcm"))

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Send ``sig`` (default SIGTERM: graceful), wait, SIGKILL if needed; the exit code."""
        return self.stop_process(sig, timeout=STOP_TIMEOUT_S + 10)

    def kill(self) -> int | None:
        """SIGKILL at once (crash tests)."""
        return self.stop_process(signal.SIGKILL)
