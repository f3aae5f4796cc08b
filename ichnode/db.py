"""Database schema and session helpers.

The components (receiver, series completion, worker, dispatcher) talk to each
other only through these tables and the spool folder, so each can be
restarted on its own and resumes from the rows it finds.

Series life cycle (``Series.state``)::

    receiving --stable_seconds without a new instance--> complete
    complete --worker claims--> processing --> scored | skipped | failed
    any state --a new instance arrives--> receiving   (scored again later,
                                                       as a new result version)
    scored | skipped | failed --ichnode rescore--> complete   (a new version too)
"""

from __future__ import annotations

import datetime as dt
import os
import re
import sqlite3
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    func,
    inspect,
    or_,
    select,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, NoSuchModuleError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker
from sqlalchemy.pool import NullPool

SCHEMA_VERSION = 1

# Series states
RECEIVING = "receiving"
COMPLETE = "complete"
PROCESSING = "processing"
SCORED = "scored"
SKIPPED = "skipped"
FAILED = "failed"
FINISHED = (SCORED, SKIPPED, FAILED)  # nothing more happens to it until images arrive
SERIES_STATES = (RECEIVING, COMPLETE, PROCESSING, *FINISHED)

# Delivery states
QUEUED = "queued"
SENDING = "sending"  # claimed by a dispatcher, its C-STORE under way
SENT = "sent"
DEAD = "dead"
SUPERSEDED = "superseded"  # a newer result of the series replaced this report
UNDELIVERED = (QUEUED, SENDING)  # still on its way: what a newer result supersedes

# How a scored result whose report objects could not be made (a full disk)
# begins its reason: nothing is on its way to the PACS for it.
REPORTS_NOT_BUILT = "scored, but its reports could not be built"


def reports_not_built(series_id: Any) -> Any:
    """Whether the series' current result is one whose reports could not be
    built (a condition for queries; ``series_id`` a column or a value)."""
    return (
        select(SeriesResult.id)
        .where(
            SeriesResult.series_id == series_id,
            SeriesResult.superseded.is_(False),
            SeriesResult.skip_reason.startswith(REPORTS_NOT_BUILT, autoescape=True),
        )
        .exists()
    )


def current_scored_result(session: Session, series_id: int, *, before_version: int | None = None) -> Any:
    """The (id, slice_count) of the series' newest scored result that is not
    superseded (of a version before ``before_version``); None if it has none."""
    query = select(SeriesResult.id, SeriesResult.slice_count).where(
        SeriesResult.series_id == series_id,
        SeriesResult.status == SCORED,
        SeriesResult.superseded.is_(False),
    )
    if before_version is not None:
        query = query.where(SeriesResult.version < before_version)
    return session.execute(query.order_by(SeriesResult.id.desc()).limit(1)).first()


def slices_removed(session: Session, result_id: int) -> int:
    """How many of the slices a result was scored from have no instance row
    any more. Only retention deletes instance rows, so these images are gone
    (a re-filed image keeps its row under another series)."""
    kept = select(Instance.id).where(Instance.sop_instance_uid == SliceResult.sop_instance_uid)
    return (
        session.scalar(
            select(func.count()).select_from(SliceResult).where(SliceResult.result_id == result_id, ~kept.exists())
        )
        or 0
    )


def find_series(session: Session, uid: str) -> list[int]:
    """Ids of the series of a study (its Study Instance UID), or of the one
    series given. ``uid`` may also be the end of one UID, with or without
    the "..." that ``results list`` prints before it; a ValueError says when
    it is the end of several."""

    def named(full: str) -> list[int]:
        query = select(Series.id).where(or_(Series.study_uid == full, Series.series_uid == full))
        return list(session.scalars(query.order_by(Series.id)))

    found = named(uid)
    if not found:
        full = _uid_ending_with(session, uid.removeprefix("..."))
        found = named(full) if full else []
    return found


def _uid_ending_with(session: Session, suffix: str) -> str | None:
    """The one study or series UID that ends with ``suffix``; None if none does."""
    if not suffix:
        return None
    found: set[str] = set()
    for column in (Series.study_uid, Series.series_uid):
        found.update(session.scalars(select(column).where(column.endswith(suffix, autoescape=True)).distinct()))
    if len(found) > 1:
        shown = sorted(found)
        raise ValueError(
            f"{suffix!r} is the end of {len(shown)} study or series UIDs ({', '.join(shown[:5])}"
            + (", ..." if len(shown) > 5 else "")
            + "); give more of it"
        )
    return found.pop() if found else None


def utcnow() -> dt.datetime:
    """Naive UTC now: every timestamp in the database is naive UTC."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON}


class Meta(Base):
    """Key/value facts about the database itself (the schema version)."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(128), unique=True)
    study_uid: Mapped[str] = mapped_column(String(128), index=True)
    patient_id: Mapped[str | None] = mapped_column(String(128))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[str | None] = mapped_column(String(16))
    series_description: Mapped[str | None] = mapped_column(String(128))
    body_part: Mapped[str | None] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    peer_host: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=RECEIVING, index=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    # Bumped each time the series becomes complete: late slices make a new version.
    version: Mapped[int] = mapped_column(Integer, default=0)
    claimed_at: Mapped[dt.datetime | None] = mapped_column(DateTime)

    instances: Mapped[list[Instance]] = relationship(back_populates="series")
    results: Mapped[list[SeriesResult]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(128), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(128))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(128))
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    # Relative to storage.spool_dir.
    path: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(Integer)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    peer_host: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    # How many times this SOP Instance UID arrived; the newest copy is kept.
    times_received: Mapped[int] = mapped_column(Integer, default=1)
    quarantine_reason: Mapped[str | None] = mapped_column(Text)

    series: Mapped[Series] = relationship(back_populates="instances")


class SeriesResult(Base):
    """One scoring (or skip decision) of one version of a series."""

    __tablename__ = "series_result"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))  # scored | skipped | failed
    skip_reason: Mapped[str | None] = mapped_column(Text)
    model_name: Mapped[str | None] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(64))
    scores: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    flags: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    thresholds: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    key_sop_instance_uid: Mapped[str | None] = mapped_column(String(128))
    slice_count: Mapped[int] = mapped_column(Integer, default=0)
    quarantined_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    superseded: Mapped[bool] = mapped_column(default=False)

    series: Mapped[Series] = relationship(back_populates="results")
    slices: Mapped[list[SliceResult]] = relationship(back_populates="result")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="result")


class SliceResult(Base):
    __tablename__ = "slice_result"

    id: Mapped[int] = mapped_column(primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("series_result.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(128))
    position: Mapped[int] = mapped_column(Integer)  # index in z order
    scores: Mapped[dict[str, Any]] = mapped_column(JSON)

    result: Mapped[SeriesResult] = relationship(back_populates="slices")


class Delivery(Base):
    """One report object to be stored at one destination, retried until it is."""

    __tablename__ = "delivery"

    id: Mapped[int] = mapped_column(primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("series_result.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # sr | summary
    sop_instance_uid: Mapped[str] = mapped_column(String(128))
    path: Mapped[str] = mapped_column(String(512))  # relative to spool_dir
    ae_title: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=QUEUED, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime)

    result: Mapped[SeriesResult] = relationship(back_populates="deliveries")


def sqlite_file(url: str) -> Path | None:
    """The file of an SQLite URL; None for other databases and in-memory ones."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def make_engine(url: str) -> Engine:
    """Create an engine; SQLite gets WAL mode and a busy timeout on every connection."""
    is_sqlite = make_url(url).get_backend_name() == "sqlite"
    kwargs: dict[str, Any] = {}
    if is_sqlite:
        path = sqlite_file(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        # Threads of one process share the engine; SQLite itself serialises writers.
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        # A pooled connection a database server's restart left stale is replaced, not handed out to fail.
        kwargs["pool_pre_ping"] = True
        kwargs["connect_args"] = _server_timeouts(make_url(url))
    engine = create_engine(url, **kwargs)
    if is_sqlite:
        event.listen(engine, "connect", _sqlite_on_connect)
    return engine


# Bounded waits on a PostgreSQL server through libpq (psycopg, psycopg2): a
# server that does not answer (a host gone, a network black hole) makes a
# C-STORE fail in seconds, with a line in the log, instead of hanging the
# association and the node's stop. Options in the URL take precedence.
_LIBPQ_TIMEOUTS = {
    "connect_timeout": 10,  # seconds
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30000,  # ms of data sent without acknowledgement
}


def _server_timeouts(url: Any) -> dict[str, Any]:
    if url.get_backend_name() != "postgresql" or url.get_driver_name() not in ("psycopg", "psycopg2"):
        return {}
    return {key: value for key, value in _LIBPQ_TIMEOUTS.items() if key not in url.query}


class DatabaseUnreadable(Exception):
    """The node's database cannot be read, or is not one; the message names it and why."""


class NewerSchema(RuntimeError):
    """The database was made by a newer ichnode."""


def driver_problem(url: str) -> str | None:
    """Why the database driver a URL names cannot be loaded (not installed), None when it can."""
    parsed = make_url(url)
    try:
        parsed.get_dialect().import_dbapi()
    except (ImportError, NoSuchModuleError) as exc:
        return f"cannot load the driver for {parsed.drivername}: {exc}"
    return None


def server_problem(url: str) -> str | None:
    """Why a database server a URL names cannot be reached or logged in to
    (None when it can, and for SQLite, whose file the node makes)."""
    if make_url(url).get_backend_name() == "sqlite" or driver_problem(url):
        return None
    engine = make_engine(url)
    try:
        with engine.connect():
            return None
    except DBAPIError as exc:
        return f"cannot connect: {error_text(exc)}"
    finally:
        engine.dispose()


def open_node_database(url: str, *, before_creating: Callable[[], object] = lambda: None) -> Engine:
    """The node's database, its tables made and its schema version checked.

    A new database (no SQLite file yet, or no tables) is made only after
    ``before_creating`` returns: what it raises refuses it with nothing made.

    Raises :class:`DatabaseUnreadable` naming it, password hidden, and why: its
    driver is missing, its server refuses, the file is not a database, its
    schema is newer.
    """
    where = shown_url(url)
    problem = driver_problem(url)
    if problem:
        raise DatabaseUnreadable(f"cannot open the database {where}: {problem}")
    path = sqlite_file(url)
    new_file = path is not None and not path.exists()
    if new_file:
        before_creating()  # not even the file's folder is made yet
    engine = None
    try:
        engine = make_engine(url)
        if not new_file and not _setting_up(engine, lambda: _has_tables(engine)):
            before_creating()  # a new database on a server, an empty file
        init_db(engine)
        return engine
    except BaseException as exc:
        if engine is not None:
            engine.dispose()
        if isinstance(exc, (SQLAlchemyError, NewerSchema, OSError)):
            raise DatabaseUnreadable(f"cannot open the database {where}: {error_text(exc)}") from None
        raise


def shown_url(url: str) -> str:
    """A database URL as the node prints it: its password hidden, also one
    given as a query parameter (``?password=``, common with socket URLs)."""
    shown = make_url(url).render_as_string(hide_password=True)
    return re.sub(r"([?&](?:ssl)?password=)[^&]*", r"\1***", shown)


def error_text(exc: BaseException) -> str:
    """A database error as one line: the driver's own message, which drivers
    spread over several lines (PostgreSQL: "Is the server running ...")."""
    reason = exc.orig if isinstance(exc, DBAPIError) else exc
    return " ".join(str(reason).split())


def open_existing(url: str) -> Engine:
    """An engine on the node's database for commands that only read it
    (``status``, ``results``): a missing SQLite file is an error, not a new
    empty database in the wrong place, and an SQLite file is opened read-only.

    Raises :class:`FileNotFoundError` (no such file) or :class:`DatabaseUnreadable`.
    """
    engine, where = _read_only_engine(url)
    try:
        with engine.connect() as connection:
            tables = set(inspect(connection).get_table_names())
    except DBAPIError as exc:
        engine.dispose()
        raise DatabaseUnreadable(f"cannot read the database {where}: {error_text(exc)}") from None
    missing = sorted(set(Base.metadata.tables) - tables)
    if missing:
        engine.dispose()
        raise DatabaseUnreadable(f"{where} is not an ichnode database (it has no table {', '.join(missing)})")
    return engine


def stored_installation(url: str) -> tuple[str | None, bool]:
    """What a node would find in its database, read as :func:`open_existing`
    reads, making nothing: its :func:`installation` (None when it has none yet:
    no SQLite file, no tables) and whether it holds no series.

    Raises :class:`DatabaseUnreadable`.
    """
    try:
        engine, where = _read_only_engine(url)
    except FileNotFoundError:
        return None, True
    try:
        with engine.connect() as connection:
            tables = set(inspect(connection).get_table_names())
            facts = {}
            if Meta.__tablename__ in tables:
                facts = {key: value for key, value in connection.execute(select(Meta.key, Meta.value))}
            empty = Series.__tablename__ not in tables or connection.scalar(select(Series.id).limit(1)) is None
    except DBAPIError as exc:
        raise DatabaseUnreadable(f"cannot read the database {where}: {error_text(exc)}") from None
    finally:
        engine.dispose()
    if "installation" not in facts and "schema_version" in facts:
        return "", empty  # made before installations: init_db gives it ""
    return facts.get("installation"), empty


def _read_only_engine(url: str) -> tuple[Engine, str]:
    """An engine that reads the node's database (an SQLite file read-only) and
    the database as messages name it; FileNotFoundError for an SQLite file that is not there."""
    path = sqlite_file(url)
    if path is None:
        where = shown_url(url)
        problem = driver_problem(url)
        if problem:
            raise DatabaseUnreadable(f"cannot read the database {where}: {problem}")
        return make_engine(url), where
    if not path.is_file():
        raise FileNotFoundError(
            f"no database at {path}: has the node run with this configuration? "
            "(--config or ICHNODE_CONFIG names the one `ichnode serve` uses)"
        )
    target = path.resolve()  # SQLite keeps -wal and -shm beside a link's target
    unreadable = [str(p) for p in (target, Path(f"{target}-wal"), Path(f"{target}-shm")) if _exists_unreadable(p)]
    if unreadable:
        raise DatabaseUnreadable(
            f"cannot read the database {path}: permission denied on {', '.join(unreadable)} "
            "(status and results need read access to the database and its -wal and -shm files)"
        )
    return _read_only_sqlite(target), str(path)


def _exists_unreadable(path: Path) -> bool:
    return path.exists() and not os.access(path, os.R_OK)


def _read_only_sqlite(target: Path) -> Engine:
    """An engine that cannot write the file: no journal mode switch, and no
    new -wal or -shm files where no node has the database open, so it works
    on a read-only mount and leaves no file behind owned by whoever ran the
    command (a root-owned -shm would stop the node's next start). ``target``
    is the database file itself, not a link to it."""
    base = f"file:{urllib.parse.quote(str(target))}?mode=ro"

    def connect() -> sqlite3.Connection:
        # Decided at each connection: a node may start while the command runs.
        # With no -wal file no node has it open (the last connection removes
        # it), and "immutable" keeps SQLite from creating one.
        immutable = not Path(f"{target}-wal").exists()
        uri = base + ("&immutable=1" if immutable else "")
        return sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False)

    return create_engine("sqlite://", creator=connect, poolclass=NullPool)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a commit survives a process crash (kill -9); after a
    # power loss the spool scan at start-up re-indexes any file whose row was lost.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


# Any number of PostgreSQL's shared advisory locks: the one ichnode takes to set up its tables.
_SCHEMA_LOCK = 0x1C4D0DE


def init_db(engine: Engine) -> None:
    """Create missing tables and record the schema version; refuse a newer schema."""
    _setting_up(engine, lambda: _init_db(engine))


def _setting_up(engine: Engine, step: Callable[[], _T]) -> _T:
    """``step`` of opening a database, tried again while another process of
    the node sets up the same new SQLite database ("table meta already
    exists", "database is locked"): the next try finds what it made.
    (PostgreSQL takes a lock instead, and there such an error is a server not
    answering.)"""
    for attempt in range(_INIT_TRIES - 1):
        try:
            return step()
        except (OperationalError, IntegrityError):
            if engine.dialect.name != "sqlite":
                raise
            time.sleep(0.2 * (attempt + 1))
    return step()


def _has_tables(engine: Engine) -> bool:
    with engine.connect() as connection:
        return inspect(connection).has_table(Meta.__tablename__)


_INIT_TRIES = 5
_T = TypeVar("_T")


def _init_db(engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        if engine.dialect.name == "postgresql":
            # Processes started together (stages run as separate services)
            # take turns: PostgreSQL does not serialise two CREATE TABLEs.
            session.execute(select(func.pg_advisory_xact_lock(_SCHEMA_LOCK)))
        Base.metadata.create_all(session.connection())
        row = session.get(Meta, "schema_version")
        if session.get(Meta, "installation") is None:
            # A new database gets its own; one made before there was an
            # installation keeps the report UIDs it has derived ("").
            session.add(Meta(key="installation", value=uuid.uuid4().hex if row is None else ""))
        if row is None:
            session.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
        elif int(row.value) > SCHEMA_VERSION:
            raise NewerSchema(
                f"database schema version {row.value} is newer than this ichnode "
                f"({SCHEMA_VERSION}); upgrade ichnode"
            )


def installation(factory: sessionmaker[Session]) -> str:
    """This database's own random identity, mixed into the report UIDs: two
    nodes, or one whose database was made again, never give one UID to two
    different reports."""
    with factory() as session:
        row = session.get(Meta, "installation")
        return row.value if row is not None else ""


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One short transaction: commit on success, roll back on any error."""
    with factory() as session, session.begin():
        yield session


def count_by_state(session: Session, column: Any) -> dict[str, int]:
    rows = session.execute(select(column, func.count()).group_by(column)).all()
    return {state: count for state, count in rows}
