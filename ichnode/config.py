"""The node's configuration: one YAML file, validated once into frozen objects.

The defaults below are the embedded configuration; the top-level
``config.yaml`` spells out the same values with comments (a test keeps the two
equal).  Every error names the key and the bad value.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_VAR = "ICHNODE_CONFIG"
DEFAULT_PATH = Path("config.yaml")

LABELS = (
    "any",
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
)


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or invalid."""


def _not_a_boolean(value: Any) -> Any:
    # YAML reads yes, on and true as a boolean, which a number would take for
    # 1: retention_days: true would delete images after a day. Numbers are
    # otherwise taken as they come: 7.0 for 7, "6e2" (text to YAML) for 600.
    if isinstance(value, bool):
        raise ValueError("a number is needed, not yes/no/on/off/true/false")
    return value


Int = Annotated[int, BeforeValidator(_not_a_boolean)]
Float = Annotated[float, BeforeValidator(_not_a_boolean)]


class _Section(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_means_defaults(cls, data: Any) -> Any:
        # A section whose keys are all commented out ("node:" alone) reads as
        # None: that is how the shipped file's values are reset to defaults.
        return {} if data is None else data


def _check_ae_title(value: str) -> str:
    # Leading and trailing spaces are not significant (PS3.5 6.2) and the
    # receiver compares stripped titles, so store the stripped value.
    stripped = value.strip(" ")
    # ASCII only: pynetdicom refuses any other title, but only once the node
    # starts or first sends a report.
    if not 0 < len(stripped) <= 16 or "\\" in value or not value.isprintable() or not value.isascii():
        raise ValueError(f"AE title must be 1 to 16 printable ASCII characters, got {value!r}")
    return stripped


def _check_peer_host(value: str | None) -> str | None:
    if value is None:
        return value
    # "" would be looked up as a host name and never match or connect.
    if not value.strip():
        raise ValueError("host must not be empty")
    # "10.1.2.0/24" would be looked up as a host name, fail, and refuse every
    # association with only a log warning to explain.
    if "/" in value:
        raise ValueError("host must be one host name or address; networks are not supported: list each host")
    # "10.1.2.10:104" would be looked up as a host name and never match or
    # connect; an IPv6 address is the one host with colons.
    if ":" in value:
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            raise ValueError(
                f"host must be a name or an address without a port (give that as port), got {value!r}"
            ) from None
        return value
    # "ct2..radiology.org", or a label over 63 characters, can never be looked up.
    try:
        value.encode("idna")
    except UnicodeError:
        raise ValueError(
            f"host {value!r} is not a valid host name (an empty label, or one over 63 characters)"
        ) from None
    return value


def _check_allowed_host(value: str | None) -> str | None:
    try:
        return _check_peer_host(value)
    except ValueError as exc:
        if value is not None and not value.strip():
            raise ValueError(f"{exc}; leave host out to accept the AE title from any host") from None
        raise


def _check_path(path: Path | None) -> Path | None:
    """``path`` with a leading ``~`` made the home folder of the user the node
    (or the command) runs as; a path holding ``$`` is refused: the node does not
    expand environment variables, and under systemd its environment is not the
    administrator's shell's. Taken literally, either would name a folder ``~``
    or ``$HOME`` beside the configuration file."""
    if path is None:
        return None
    if "$" in str(path):
        raise ValueError("environment variables are not expanded in paths; write the path out")
    try:
        return path.expanduser()
    except RuntimeError as exc:  # no home folder for this user
        raise ValueError(f"cannot expand ~: {exc}") from None


def _check_listen_host(value: str) -> str:
    # "" makes the server listen on every interface: a node meant to be
    # local would not be. Listening everywhere must be written out.
    if not value.strip():
        raise ValueError("host must not be empty; write 0.0.0.0 (or ::) to listen on every interface")
    return _check_peer_host(value)


class NodeConfig(_Section):
    ae_title: str = "ICHNODE"
    host: str = "127.0.0.1"
    # 0 picks a free port (tests); the log says which.
    port: Int = Field(11112, ge=0, le=65535)
    max_associations: Int = Field(8, ge=1)
    # Receiver processes sharing the port (SO_REUSEPORT). More than one lets
    # concurrent associations use several CPU cores; max_associations applies
    # to each.
    receiver_processes: Int = Field(1, ge=1, le=32)

    _ae = field_validator("ae_title")(_check_ae_title)
    _host = field_validator("host")(_check_listen_host)


class Peer(_Section):
    """An allowed calling AE: ``ae_title`` ("*" for any), optionally bound to ``host``.

    ``port`` is where the peer listens, used when reports are returned to it.
    """

    ae_title: str
    host: str | None = None
    port: Int | None = Field(None, ge=1, le=65535)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return value if value == "*" else _check_ae_title(value)

    _host = field_validator("host")(_check_allowed_host)


class AccessConfig(_Section):
    allow: tuple[Peer, ...] = (Peer(ae_title="*", host="127.0.0.1"),)

    @field_validator("allow")
    @classmethod
    def _not_empty(cls, value: tuple[Peer, ...]) -> tuple[Peer, ...]:
        # Default deny: an empty list would refuse every association, a node
        # that starts but can never receive anything.
        if not value:
            raise ValueError(
                "an empty list refuses every association; list the calling AEs, "
                'or write [{ae_title: "*"}] to accept any AE title from any host'
            )
        return value


class StorageConfig(_Section):
    spool_dir: Path = Path("ichnode-data/spool")
    min_free_mb: Int = Field(1024, ge=0)
    # fsync every received file and its folder before answering Success.
    fsync: bool = True
    retention_days: Int = Field(7, ge=0)

    _spool = field_validator("spool_dir")(_check_path)


class DatabaseConfig(_Section):
    url: str = "sqlite:///ichnode-data/ichnode.db"

    @field_validator("url")
    @classmethod
    def _shared(cls, value: str) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        from .db import sqlite_file

        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError("not an SQLAlchemy database URL, e.g. sqlite:///ichnode-data/ichnode.db") from None
        if url.get_backend_name() == "sqlite" and _sqlite_in_memory(url.database, url.query):
            raise ValueError(
                "an in-memory SQLite database is not shared between threads and processes, but the node's "
                "stages must all use one database; use a file, e.g. sqlite:///ichnode-data/ichnode.db"
            )
        path = sqlite_file(value)
        expanded = _check_path(path)
        if expanded != path:
            return url.set(database=str(expanded)).render_as_string(hide_password=False)
        return value


def _sqlite_in_memory(database: str | None, query: Any) -> bool:
    """Whether an SQLite URL's database is in memory (or a per-connection temporary one)."""
    if not database or database == ":memory:":
        return True
    if database.startswith("file:"):
        path = database[len("file:"):].split("?", 1)[0]
        mode = query.get("mode", ())
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
        return path in ("", ":memory:") or any(m.lower() == "memory" for m in modes)
    return False


class SeriesConfig(_Section):
    stable_seconds: Float = Field(10.0, gt=0)
    check_interval_seconds: Float = Field(1.0, gt=0)
    min_slices: Int = Field(10, ge=1)
    # Largest angle between the slice normal and the patient's z axis still
    # called axial; admits gantry tilt (typically up to ~30 degrees).
    axial_tolerance_degrees: Float = Field(35.0, ge=0, le=90)
    # A series is a head series when its BodyPartExamined contains one of
    # these words (case-insensitive); when that tag is empty, when a study or
    # series description or protocol name does; with all of them empty, it is.
    head_keywords: tuple[str, ...] = ("HEAD", "BRAIN", "SKULL", "CRANI", "CEREBR", "NEURO")
    # Hemorrhage is read on non-contrast CT: in a contrast-enhanced series
    # (an agent, volume or dose given, or a description such as "CTA")
    # vessels and dura are as bright as blood.
    skip_contrast: bool = True


class ModelConfig(_Section):
    path: Path | None = None  # None: the bundled default model
    batch_size: Int = Field(32, ge=1)
    worker_processes: Int | None = Field(None, ge=1)  # None: CPU cores - 1, at least 2
    thresholds: dict[str, Float] = Field(default_factory=dict)

    _path = field_validator("path")(_check_path)

    @field_validator("thresholds")
    @classmethod
    def _labels(cls, value: dict[str, float]) -> dict[str, float]:
        for label, threshold in value.items():
            if label not in LABELS:
                raise ValueError(f"unknown label {label!r}, expected one of {LABELS}")
            if not 0.0 <= threshold <= 1.0:
                raise ValueError(f"threshold for {label!r} must be in [0, 1], got {threshold}")
        return value


class Destination(_Section):
    ae_title: str
    host: str
    port: Int = Field(ge=1, le=65535)

    _ae = field_validator("ae_title")(_check_ae_title)
    _host = field_validator("host")(_check_peer_host)


class RetryConfig(_Section):
    first_delay_s: Float = Field(5.0, gt=0)
    max_delay_s: Float = Field(600.0, gt=0)
    max_attempts: Int = Field(20, ge=1)


class ReportsConfig(_Section):
    sr: bool = True
    summary_image: bool = True
    return_to_sender: bool = False
    destinations: tuple[Destination, ...] = ()
    retry: RetryConfig = RetryConfig()
    # Connect, association, DIMSE and network timeouts with a destination: a
    # PACS across a slow link may need more, one that never answers holds
    # back only its own reports for this long.
    timeout_seconds: Float = Field(30.0, gt=0, le=3600)

    @field_validator("destinations")
    @classmethod
    def _once_each(cls, value: tuple[Destination, ...]) -> tuple[Destination, ...]:
        # One delivery is made per entry: a destination listed twice (merged
        # config snippets) would get every report twice.
        seen = set()
        for destination in value:
            key = (destination.ae_title, destination.host.lower(), destination.port)
            if key in seen:
                raise ValueError(
                    f"{destination.ae_title}@{destination.host}:{destination.port} is listed twice; "
                    "every report would be sent to it twice"
                )
            seen.add(key)
        return value


class LoggingConfig(_Section):
    level: str = "INFO"

    @field_validator("level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"unknown log level {value!r}")
        return value


class Config(_Section):
    node: NodeConfig = NodeConfig()
    access: AccessConfig = AccessConfig()
    storage: StorageConfig = StorageConfig()
    database: DatabaseConfig = DatabaseConfig()
    series: SeriesConfig = SeriesConfig()
    model: ModelConfig = ModelConfig()
    reports: ReportsConfig = ReportsConfig()
    logging: LoggingConfig = LoggingConfig()

    def resolve_paths(self, base: Path) -> Config:
        """Return a copy whose relative paths (spool, SQLite file, model) are under ``base``."""
        spool = self.storage.spool_dir
        model = self.model.path
        return self.model_copy(
            update={
                "storage": self.storage.model_copy(
                    update={"spool_dir": spool if spool.is_absolute() else base / spool}
                ),
                "database": self.database.model_copy(
                    update={"url": _resolve_sqlite_url(self.database.url, base)}
                ),
                "model": self.model.model_copy(
                    update={"path": model if model is None or model.is_absolute() else base / model}
                ),
            }
        )

    def to_yaml(self) -> str:
        """The effective configuration as YAML, the database password hidden."""
        from .db import shown_url

        data = self.model_dump(mode="json")
        data["database"]["url"] = shown_url(self.database.url)
        return yaml.safe_dump(data, sort_keys=False)

    def report_addresses(self) -> set[tuple[str, str, int]]:
        """Where reports may go now: ``reports.destinations`` and, with
        ``return_to_sender``, the senders' addresses in ``access.allow``."""
        addresses = {(d.ae_title, d.host, d.port) for d in self.reports.destinations}
        if self.reports.return_to_sender:
            addresses |= {
                (peer.ae_title, peer.host, peer.port)
                for peer in self.access.allow
                if peer.ae_title != "*" and peer.host and peer.port
            }
        return addresses


def _resolve_sqlite_url(url: str, base: Path) -> str:
    """A relative SQLite file is relative to the configuration file's folder."""
    from sqlalchemy.engine import make_url

    from .db import sqlite_file

    path = sqlite_file(url)
    if path is None or path.is_absolute():
        return url
    return make_url(url).set(database=str((base / path).resolve())).render_as_string(hide_password=False)


def default_config_path() -> Path | None:
    """``$ICHNODE_CONFIG``, else ``./config.yaml`` if it exists, else None (embedded defaults)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return DEFAULT_PATH if DEFAULT_PATH.exists() else None


def parse_config(data: Any, base: Path) -> Config:
    """Validate a mapping (as read from YAML) into a :class:`Config`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"the configuration must be a mapping, got {type(data).__name__}")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"])
            value = error.get("input")
            problems.append(f"{key}: {error['msg']} (got {value!r})")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from None
    config = config.resolve_paths(base)
    problems = _cross_check(config)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return config


def model_path_problem(config: Config) -> str | None:
    """What is wrong with ``model.path`` on this machine, if anything.

    Checked by ``check-config`` and by ``serve`` when it runs the worker, not
    by every command: a receiver, a dispatcher or ``status`` need no model.
    """
    model = config.model.path
    if model is None:
        return None
    from .model import card_path_for

    found = sorted(model.glob("*.keras")) if model.is_dir() else [model]
    if len(found) != 1 or not found[0].is_file():
        what = f"found {len(found)} in the folder" if model.is_dir() else "no such file"
        return f"model.path: expected a .keras file or a folder holding one, {what} (got {str(model)!r})"
    if not card_path_for(found[0]).is_file():
        return f"model.path: the model card {card_path_for(found[0])} is missing (got {str(model)!r})"
    # What serve would refuse at start, checked without loading a backend:
    # the card as serve reads it, and a .keras file that is a Keras archive.
    from .model import ModelCard, ModelCardError

    try:
        ModelCard.from_json(card_path_for(found[0]))
    except ModelCardError as exc:
        return f"model.path: {exc}"
    try:
        with zipfile.ZipFile(found[0]) as archive:
            has_config = "config.json" in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        has_config = False
    if not has_config:
        return f"model.path: {found[0]} is not a Keras model file (a zip archive holding config.json)"
    return None


# The Keras backends (KERAS_BACKEND; Keras's default is TensorFlow).
KERAS_BACKENDS = ("jax", "numpy", "openvino", "tensorflow", "torch")

# Keras imported as the worker imports it; an error is its one line.
_IMPORT_KERAS = """
import sys
try:
    import keras
except Exception as exc:
    sys.exit(str(exc) or repr(exc))
"""


def keras_backend() -> str:
    """The Keras backend this environment selects: ``$KERAS_BACKEND``, else Keras's default."""
    return os.environ.get("KERAS_BACKEND") or "tensorflow"


def keras_backend_problem() -> str | None:
    """Why the worker could not load a model under :func:`keras_backend` here, if it could not.

    A backend installed by hand is loaded, with Keras, in a child process: it
    needs more than its own package (jax needs jaxlib, Keras's numpy backend
    imports scipy and jax), and what more changes with Keras's version.
    TensorFlow, which comes with ichnode and what it needs, is only looked
    for: importing it takes seconds.
    """
    import importlib.util

    backend = keras_backend()
    if backend not in KERAS_BACKENDS:
        return f"KERAS_BACKEND: unknown Keras backend {backend!r}, expected one of {list(KERAS_BACKENDS)}"
    why = None
    if backend == "tensorflow":
        if importlib.util.find_spec("tensorflow") is None:
            why = "No module named 'tensorflow'"
    else:
        child = subprocess.run([sys.executable, "-c", _IMPORT_KERAS], capture_output=True, text=True)
        if child.returncode:
            why = (child.stderr.strip().splitlines() or [f"exit status {child.returncode}"])[-1]
    return f"KERAS_BACKEND: Keras backend {backend!r} cannot be loaded in this environment: {why}" if why else None


def unresolved_hosts(config: Config) -> list[str]:
    """The peers' host names that do not resolve here, each naming its key.

    A destination's typo would otherwise show only once its reports are dead
    letters, hours later, and an allowed sender's as refused associations.
    Warnings, not errors: a name may resolve only on the node's network, or
    DNS be down for a moment, and the node looks names up again as it goes.
    """
    hosts = [(f"access.allow.{i}.host", peer.host) for i, peer in enumerate(config.access.allow) if peer.host]
    hosts += [(f"reports.destinations.{i}.host", d.host) for i, d in enumerate(config.reports.destinations)]
    problems = []
    for key, host in hosts:
        try:
            socket.getaddrinfo(host, None)
        except (OSError, UnicodeError) as exc:  # UnicodeError: a name IDNA cannot encode ("a..b")
            problems.append(f"{key}: cannot resolve host {host}: {getattr(exc, 'strerror', None) or exc}")
    return problems


def _cross_check(config: Config) -> list[str]:
    """What each key's own check cannot see: keys that depend on each other."""
    problems = []
    if config.reports.return_to_sender and not any(
        peer.ae_title != "*" and peer.host and peer.port for peer in config.access.allow
    ):
        problems.append(
            "reports.return_to_sender: no access.allow entry names an AE title with host and port, so no sender "
            "can be sent reports; wildcard entries (ae_title \"*\") cannot be return addresses (got True)"
        )
    return problems


def load_config(path: Path | str | None = None) -> Config:
    """Read and validate the configuration.

    Parameters
    ----------
    path
        A YAML file. ``None`` uses :func:`default_config_path`, and the embedded
        defaults (relative to the working directory) when there is no file.

    Raises
    ------
    ConfigError
        The file cannot be read or a key has a bad value; the message names them.
    """
    if path is None:
        path = default_config_path()
    if path is None:
        return parse_config({}, Path.cwd())
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A comment saved as Latin-1 on a Windows workstation: name the place.
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path} is not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start} (line {line}); "
            "save it as UTF-8"
        ) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_config(data, path.resolve().parent)


class _DuplicateKey(Exception):
    """A mapping of the configuration file gives one key twice."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``, except that a key given twice in one mapping is an error:
    PyYAML would keep the last one, so a second ``node:`` block would silently
    undo the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor" merges, it does not repeat
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = lines.get(key)
            except TypeError:  # an unhashable key: the base class says so
                continue
            if first is not None:
                raise _DuplicateKey(f"{key} is given twice, lines {first} and {line}; remove one")
            lines[key] = line
        return super().construct_mapping(node, deep=deep)
