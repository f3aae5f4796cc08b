"""``ichnode status``: what the node holds, read from the database and the spool."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from . import db
from .config import Config
from .series import REPORTS_TRIES


def collect_status(config: Config) -> dict[str, Any]:
    engine = db.open_existing(config.database.url)
    spool_dir = config.storage.spool_dir
    try:
        with db.session_factory(engine)() as session:
            instances = session.scalar(select(func.count()).select_from(db.Instance)) or 0
            quarantined = (
                session.scalar(
                    select(func.count()).select_from(db.Instance).where(db.Instance.quarantine_reason.is_not(None))
                )
                or 0
            )
            received_again = session.scalar(select(func.sum(db.Instance.times_received - 1))) or 0
            unreported = session.scalar(
                select(func.count()).select_from(db.Series).where(db.reports_not_built(db.Series.id))
            )
            series = db.count_by_state(session, db.Series.state)
            deliveries = db.count_by_state(session, db.Delivery.state)
            dead = [
                {
                    "sop_instance_uid": d.sop_instance_uid,
                    "destination": f"{d.ae_title}@{d.host}:{d.port}",
                    "attempts": d.attempts,
                    "last_error": d.last_error,
                    # What `ichnode send` would take, and whether it is still there to requeue.
                    "path": str(spool_dir / d.path),
                    "file_exists": (spool_dir / d.path).is_file(),
                }
                for d in session.scalars(select(db.Delivery).where(db.Delivery.state == db.DEAD))
            ]
            unconfigured = unconfigured_destinations(session, config)
    finally:
        engine.dispose()
    spool_bytes = _spool_bytes(spool_dir)
    usage = shutil.disk_usage(spool_dir if spool_dir.exists() else spool_dir.parent)
    return {
        "database": db.shown_url(config.database.url),
        "spool_dir": str(spool_dir),
        # Copies of stored instances: counted when identical, else replacing them.
        "instances": {"total": instances, "quarantined": quarantined, "received_again": int(received_again)},
        "series": series,
        "scored_without_reports": unreported,
        "deliveries": deliveries,
        "dead_letters": dead,
        "unconfigured_destinations": unconfigured,
        "spool_bytes": spool_bytes,
        "free_disk_mb": round(usage.free / 2**20),
        "min_free_mb": config.storage.min_free_mb,
    }


def unconfigured_destinations(session: Session, config: Config) -> list[dict[str, Any]]:
    """Addresses that queued or dead deliveries still go to but the configuration no longer names.

    A delivery keeps the address it was made with: after a wrong destination
    is corrected, these still go to the old one (``requeue --to`` redirects them).
    """
    configured = config.report_addresses()
    counts: dict[str, dict[str, int]] = {}
    rows = session.execute(
        select(db.Delivery.ae_title, db.Delivery.host, db.Delivery.port, db.Delivery.state, func.count())
        .where(db.Delivery.state.in_((db.QUEUED, db.DEAD)))
        .group_by(db.Delivery.ae_title, db.Delivery.host, db.Delivery.port, db.Delivery.state)
    )
    for ae_title, host, port, state, count in rows:
        if (ae_title, host, port) not in configured:
            counts.setdefault(f"{ae_title}@{host}:{port}", {})[state] = count
    return [{"destination": address, **by_state} for address, by_state in sorted(counts.items())]


def unconfigured_warning(entry: dict[str, Any]) -> str:
    """One line on deliveries to an address no longer configured, and how to send them elsewhere."""
    address = entry["destination"]
    counts = ", ".join(f"{entry[state]} {state}" for state in (db.QUEUED, db.DEAD) if entry.get(state))
    return (
        f"{counts} to {address}, which is not a configured report destination (reports.destinations); "
        f"ichnode requeue --destination {address} --to AE@HOST:PORT sends them elsewhere"
    )


def _spool_bytes(spool_dir: Path) -> int:
    """Bytes of the spooled DICOM files; a file deleted while we look (retention,
    a replaced duplicate) is skipped, not an error."""
    total = 0
    for path in spool_dir.rglob("*.dcm"):
        try:
            total += path.stat().st_size
        except FileNotFoundError:
            pass
    return total


def format_status(report: dict[str, Any]) -> str:
    lines = [
        f"database     {report['database']}",
        f"spool        {report['spool_dir']} ({report['spool_bytes'] / 2**20:.1f} MB)",
        f"free disk    {report['free_disk_mb']} MB (minimum {report['min_free_mb']} MB)",
        "instances    " + ", ".join(f"{k} {v}" for k, v in report["instances"].items()),
        "series       " + (", ".join(f"{k} {v}" for k, v in sorted(report["series"].items())) or "none"),
        "deliveries   " + (", ".join(f"{k} {v}" for k, v in sorted(report["deliveries"].items())) or "none"),
    ]
    for dead in report["dead_letters"]:
        lines.append(
            f"dead letter  {dead['sop_instance_uid']} to {dead['destination']} after "
            f"{dead['attempts']} attempts: {dead['last_error']}; file {dead['path']}"
            + ("" if dead["file_exists"] else " (deleted)")
        )
    if report["series"].get(db.FAILED):
        lines.append(
            f"warning      {report['series'][db.FAILED]} series failed to be scored (ichnode results show says why); "
            "once the cause is mended, ichnode rescore --failed scores them again"
        )
    if report["scored_without_reports"]:
        lines.append(
            f"warning      {report['scored_without_reports']} scored series have no reports on their way: they "
            f"could not be built (ichnode results show says why); the node tries again when the spool has room "
            f"({REPORTS_TRIES} tries in all), and ichnode rescore --unreported once the cause is mended"
        )
    for entry in report["unconfigured_destinations"]:
        lines.append(f"warning      {unconfigured_warning(entry)}")
    return "\n".join(lines)
