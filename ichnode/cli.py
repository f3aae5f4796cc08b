"""The ``ichnode`` command line: serve, check the config, talk to peers, report status, requeue dead letters."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click

from . import __version__
from .config import Config, ConfigError, _check_ae_title, load_config
from .logs import quiet_source_data_warnings, setup_logging

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

logger = logging.getLogger(__name__)

# TensorFlow's C++ start-up chatter (oneDNN, CPU features) is noise in an
# administrator's terminal and in the journal; its errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CONFIG_HELP = "YAML configuration (default: $ICHNODE_CONFIG, else ./config.yaml, else the embedded defaults)."

# Images, reports and the database hold patient data: files the node creates
# are 0640 at most and folders 0750 however loose the umask it was started
# with; a stricter one stays.
PRIVATE_UMASK = 0o027


def _load(config_path: Path | None) -> Config:
    try:
        return load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def parse_address(value: str) -> tuple[str, str, int]:
    """``AE@HOST:PORT`` -> (ae_title, host, port); a usage error says what is wrong."""
    try:
        ae_title, rest = value.split("@", 1)
        host, port_text = rest.rsplit(":", 1)
        port = int(port_text)
        if not ae_title or not host:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"expected AE@HOST:PORT, got {value!r}") from None
    if not 1 <= port <= 65535:
        raise click.BadParameter(f"port must be 1 to 65535, got {port} in {value!r}")
    return check_ae_title(ae_title), host, port


def check_ae_title(value: str) -> str:
    """An AE title as the configuration accepts it; a usage error otherwise."""
    try:
        return _check_ae_title(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _address_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[str, str, int] | None:
    return parse_address(value) if value is not None else None


config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=CONFIG_HELP,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ichnode")
def main() -> None:
    """ichnode: a DICOM node that flags intracranial hemorrhage on head CT."""


@main.command()
@config_option
@click.option(
    "--components",
    default="receiver,worker,dispatcher",
    show_default=True,
    help="Comma-separated stages to run in this process (they share only the database and spool).",
)
def serve(config_path: Path | None, components: str) -> None:
    """Receive images, score series and deliver reports until SIGTERM/SIGINT."""
    from .config import model_path_problem
    from .service import ALL_COMPONENTS, WORKER, CannotListen, CannotStart, Node, explained_start_failures
    from .service import ignore_hangups

    ignore_hangups()  # from the start: loading the model takes a while
    stages = [c.strip() for c in components.split(",") if c.strip()]
    if not stages:  # a node with no stage would run and do nothing until stopped
        raise click.BadParameter(f"name at least one of {', '.join(ALL_COMPONENTS)}", param_hint="--components")
    _keep_files_private()
    config = _load(config_path)
    problem = model_path_problem(config) if WORKER in stages else None
    if problem:  # before anything is created or imported for a model that is not there
        raise click.ClickException(f"invalid configuration:\n  {problem}")
    setup_logging(config.logging.level)
    try:  # the database is opened first: one that cannot be is one line naming it, nothing made
        with explained_start_failures():
            node = Node(config, components=stages)
    except CannotStart as exc:
        raise click.ClickException(str(exc)) from None
    try:
        node.run()
    except CannotListen as exc:
        raise click.ClickException(str(exc)) from None


def _keep_files_private() -> None:
    """Add PRIVATE_UMASK's bits to the umask the node was started with, before it creates anything."""
    os.umask(os.umask(PRIVATE_UMASK) | PRIVATE_UMASK)


@main.command("check-config")
@config_option
def check_config(config_path: Path | None) -> None:
    """Validate the configuration and print the effective values (exit 1 on error).

    Also checks the model (its card, its file), that the Keras backend
    ($KERAS_BACKEND, as this command sees it) loads, that a database server
    answers and takes the URL's login, that the spool is the database's own,
    and warns of peers' host names that do not resolve here. The database
    password is printed as ***.
    """
    from .config import keras_backend, keras_backend_problem, model_path_problem, unresolved_hosts
    from .db import driver_problem, server_problem

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    database = driver_problem(config.database.url) or server_problem(config.database.url)
    problems = [
        model_path_problem(config),
        f"database.url: {database}" if database else _spool_problem(config),
        keras_backend_problem(),
    ]
    problems = [problem for problem in problems if problem]
    for unresolved in unresolved_hosts(config):
        click.echo(f"warning: {unresolved}", err=True)
    if problems:
        click.echo("error: invalid configuration:\n  " + "\n  ".join(problems), err=True)
        sys.exit(1)
    click.echo(config.to_yaml(), nl=False)
    # A YAML comment: the output stays a valid configuration file.
    click.echo(f"# Keras backend: {keras_backend()} (KERAS_BACKEND), installed")


def _spool_problem(config: Config) -> str | None:
    """Why serve would refuse the spool with this database, read without making either;
    a warning, and None, where this user cannot read them (the node's may)."""
    from .db import DatabaseUnreadable, stored_installation
    from .spool import SpoolOfAnotherDatabase, spool_owner

    try:
        installation, empty = stored_installation(config.database.url)
        spool_owner(config.storage.spool_dir, installation, database_is_empty=empty)
    except SpoolOfAnotherDatabase as exc:
        return str(exc)
    except (DatabaseUnreadable, OSError) as exc:
        click.echo(f"warning: not checked that the spool is the database's own: {exc}", err=True)
    return None


# The node's own AE title by default: a PACS that checks calling AE titles
# then answers these as it answers the node's reports.
calling_ae_option = click.option(
    "--calling-ae",
    default=None,
    callback=lambda _ctx, _param, value: check_ae_title(value) if value is not None else None,
    help="Our AE title (default: node.ae_title of the configuration).",
)


def _calling_ae(calling_ae: str | None, config_path: Path | None) -> str:
    return calling_ae or _load(config_path).node.ae_title


@main.command()
@click.argument("address", callback=_address_option)
@calling_ae_option
@config_option
def echo(address: tuple[str, str, int], calling_ae: str | None, config_path: Path | None) -> None:
    """C-ECHO a peer given as AE@HOST:PORT; exit 1 unless it answers Success."""
    from .scu import echo as do_echo

    ae_title, host, port = address
    ok, message = do_echo(ae_title, host, port, calling_ae=_calling_ae(calling_ae, config_path))
    click.echo(message)
    sys.exit(0 if ok else 1)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--to", "address", required=True, callback=_address_option, help="Destination as AE@HOST:PORT.")
@calling_ae_option
@config_option
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def send(
    paths: tuple[Path, ...],
    address: tuple[str, str, int],
    calling_ae: str | None,
    config_path: Path | None,
    progress: bool,
) -> None:
    """C-STORE DICOM files (or folders, recursively) to AE@HOST:PORT.

    Prints a summary of the response statuses; exit 1 if any file was not
    stored (refused, truncated, not DICOM). Files in a folder that are not
    DICOM images (a DICOMDIR, a README) are passed over.
    """
    from .scu import send_files

    ae_title, host, port = address
    calling_ae = _calling_ae(calling_ae, config_path)
    quiet_source_data_warnings()
    summary = send_files(list(paths), ae_title, host, port, calling_ae=calling_ae, progress=progress)
    for line in summary.lines():
        click.echo(line)
    sys.exit(0 if summary.all_stored else 1)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(config_path: Path | None, as_json: bool) -> None:
    """Instances and series by state, deliveries, dead letters (with their report files), spool size and free disk."""
    from .status import collect_status, format_status

    config = _load(config_path)
    with _reading(config):
        report = collect_status(config)
    click.echo(json.dumps(report, indent=2) if as_json else format_status(report))


@main.command()
@config_option
@click.option(
    "--destination",
    metavar="AE@HOST:PORT",
    default=None,
    callback=_address_option,
    help="Only the dead letters to this destination.",
)
@click.option(
    "--to",
    "to",
    metavar="AE@HOST:PORT",
    default=None,
    callback=_address_option,
    help="Send them to this address instead (e.g. a corrected destination); with --destination, "
    "the deliveries still queued to that destination too.",
)
def requeue(
    config_path: Path | None, destination: tuple[str, str, int] | None, to: tuple[str, str, int] | None
) -> None:
    """Put dead-lettered reports back in the delivery queue, as new (attempts from 0).

    The running node's dispatcher sends them at its next round. A dead letter
    whose report file is gone, or whose series has a newer result, stays dead
    and is listed. Each report keeps the address it was queued with, unless
    --to gives a new one.
    """
    from .dispatch import requeue_dead
    from .status import unconfigured_destinations, unconfigured_warning

    config = _load(config_path)
    with _reading(config, action="write"), _writable_sessions(config) as sessions:
        try:
            found = requeue_dead(sessions, config.storage.spool_dir, destination, to)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
        with sessions() as session:
            unconfigured = unconfigured_destinations(session, config)
    count = len(found.requeued)
    where = f" to {to[0]}@{to[1]}:{to[2]}" if to else ""
    click.echo(f"requeued {count} dead letter{'' if count == 1 else 's'}{where}")
    if found.redirected:
        click.echo(f"redirected {found.redirected} queued deliver{'y' if found.redirected == 1 else 'ies'}{where}")
    for reason, letters in (
        ("its report file is gone", found.file_gone),
        ("its series has a newer result", found.superseded),
    ):
        for letter in letters:
            click.echo(
                f"not requeued, {reason}: {letter.sop_instance_uid} to {letter.ae_title}@{letter.host}:{letter.port} "
                f"({config.storage.spool_dir / letter.path})"
            )
    # A delivery keeps the address it was made with: say so when that is no
    # longer one the configuration names (a corrected destination).
    for entry in unconfigured:
        click.echo(f"warning: {unconfigured_warning(entry)}", err=True)


@main.command()
@click.argument("uids", nargs=-1, metavar="[UID]...")
@click.option("--failed", is_flag=True, help="Every series whose scoring failed.")
@click.option(
    "--unreported", is_flag=True, help="Every series scored whose reports could not be built (status warns of them)."
)
@config_option
def rescore(uids: tuple[str, ...], failed: bool, unreported: bool, config_path: Path | None) -> None:
    """Score series again from their spooled images, as a new version.

    UID is a study (every series of it) or a series, or the end of one as the
    `results list` table shows it. The node's worker scores them at its next
    round (a stopped node when it starts); the new result and its reports
    supersede the current ones, and the PACS gets the new SR naming the one
    it holds as predecessor. Use it after a failure is mended (a full disk, a
    decoder installed), or after the model or the series rules changed.
    A series whose images retention removed is not queued, and is listed.
    """
    from .series import score_again, series_to_score_again

    if not (uids or failed or unreported):
        raise click.UsageError("name series or studies by UID, or give --failed or --unreported")
    config = _load(config_path)
    with _reading(config, action="write"), _writable_sessions(config) as sessions:
        with sessions() as session:
            try:
                ids = series_to_score_again(session, uids, failed=failed, unreported=unreported)
            except (LookupError, ValueError) as exc:
                raise click.ClickException(str(exc)) from None
        done = score_again(sessions, ids)
    click.echo(f"queued {len(done.queued)} series to be scored again")
    for uid in done.pending:
        click.echo(f"not queued, it is being received or scored already: {uid}")
    for uid, why in done.images_gone:
        click.echo(f"not queued, {why}: {uid}")


@main.group()
def results() -> None:
    """Findings per series: scores, flags, skip reasons, report delivery."""


format_option = click.option(
    "--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True
)


@results.command("list")
@config_option
@click.option("--positive", is_flag=True, help="Only series with at least one flagged finding.")
@click.option("--since", help="Only series received since then: 30m, 2h, 7d, 4w, or an ISO date/time (UTC).")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    help="Only series of this status: scored, skipped or failed, or receiving, complete or processing while "
    "on their way (repeat for several).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    help="At most this many series, the newest; 0: all. Default: 100 in a table, all in json and csv.",
)
@format_option
def results_list(
    config_path: Path | None,
    positive: bool,
    since: str | None,
    statuses: tuple[str, ...],
    limit: int | None,
    fmt: str,
) -> None:
    """One line per series, newest first."""
    from .db import SERIES_STATES
    from .results import count_results, format_results, list_results, parse_since

    try:
        since_time = parse_since(since) if since else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    for status in statuses:
        if status not in SERIES_STATES:
            raise click.BadParameter(f"{status!r} is none of {', '.join(SERIES_STATES)}", param_hint="--status")
    if limit is None:
        # A year of series is too many to read on a screen; a program reading json or csv wants them all.
        limit = 100 if fmt == "table" else 0
    filters = dict(positive=positive, since=since_time, statuses=statuses)
    config = _load(config_path)
    with _reading(config), _session(config) as session:
        rows = list_results(session, limit=limit or None, **filters)
        total = count_results(session, **filters) if limit and len(rows) == limit else len(rows)
    click.echo(format_results(rows, fmt))
    if total > len(rows):
        # Under a table; on stderr beside json or csv, which stay what a program can read.
        click.echo(f"the newest {len(rows)} of {total} series; --limit 0 shows them all", err=fmt != "table")


@results.command("show")
@click.argument("uid")
@config_option
@format_option
def results_show(uid: str, config_path: Path | None, fmt: str) -> None:
    """Every series of a study (Study Instance UID) or one series (Series Instance UID).

    UID may also be the end of one, as the `results list` table shows it
    ("...5728997848661150714813892"), if no other UID ends so.

    The table also lists each series' reports (destination, state, attempts,
    last error) and its slices' scores, in z order.
    """
    from .results import format_show, show_results

    config = _load(config_path)
    with _reading(config), _session(config) as session:
        try:
            rows = show_results(session, uid)
        except ValueError as exc:  # a suffix of several UIDs
            raise click.ClickException(str(exc)) from None
    if not rows:
        raise click.ClickException(f"no study or series {uid!r} in the database")
    click.echo(format_show(rows, fmt))


def _session(config: Config):
    from . import db

    return db.session_factory(db.open_existing(config.database.url))()


@contextmanager
def _writable_sessions(config: Config) -> Iterator[sessionmaker[Session]]:
    """Sessions on the node's database for a command that changes it: one that is
    not there, or is not an ichnode database, is an error as for ``status``."""
    from . import db

    db.open_existing(config.database.url).dispose()
    engine = db.make_engine(config.database.url)
    try:
        yield db.session_factory(engine)
    finally:
        engine.dispose()


@contextmanager
def _reading(config: Config, action: str = "read") -> Iterator[None]:
    """Errors reading (or writing) the node's database become one line naming it."""
    from sqlalchemy.exc import DBAPIError

    from .db import DatabaseUnreadable, error_text, shown_url

    try:
        yield
    except (FileNotFoundError, DatabaseUnreadable) as exc:
        raise click.ClickException(str(exc)) from None
    except DBAPIError as exc:
        where = shown_url(config.database.url)
        raise click.ClickException(f"cannot {action} the database {where}: {error_text(exc)}") from None


@main.command()
@click.option("--keep", is_flag=True, help="Keep the temporary folder (its path is printed).")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait for the reports.")
def demo(keep: bool, timeout: float) -> None:
    """Run a node on its defaults in a temporary folder, send it phantom studies, print the findings."""
    from .demo import run_demo
    from .service import CannotListen, CannotStart

    setup_logging("WARNING")
    try:
        code = run_demo(keep=keep, timeout=timeout, echo=click.echo)
    except (CannotStart, CannotListen) as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


if __name__ == "__main__":
    main()
