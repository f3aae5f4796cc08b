"""Retention: spooled images and report files are deleted ``storage.retention_days``
after their series last changed, once the series is finished (scored, skipped
or failed) and its reports are no longer waiting to be sent.

The series, its results and the delivery history stay in the database; only
the image files and their instance rows go. Images of the series that arrive
later do not replace its result unless they are all of it again (the worker's
``_older_result_stands``). ``retention_days: 0`` keeps
everything.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from . import db
from .spool import Spool

logger = logging.getLogger(__name__)

def purge_expired(sessions: sessionmaker[Session], spool: Spool, retention_days: int, *, now: dt.datetime | None = None) -> int:
    """Delete the files of finished series older than the retention; returns how many files."""
    if retention_days <= 0:
        return 0
    cutoff = (now or db.utcnow()) - dt.timedelta(days=retention_days)
    with db.transaction(sessions) as session:
        waiting = select(db.SeriesResult.series_id).join(db.Delivery).where(db.Delivery.state.in_(db.UNDELIVERED))
        expired = session.scalars(
            select(db.Series.id).where(
                db.Series.state.in_(db.FINISHED),
                db.Series.last_received_at < cutoff,
                db.Series.id.not_in(waiting),
            )
        ).all()
        if not expired:
            return 0
        instances = session.execute(
            select(db.Instance.id, db.Instance.sop_instance_uid, db.Instance.path).where(
                db.Instance.series_id.in_(expired)
            )
        ).all()
        reports = session.scalars(
            select(db.Delivery.path)
            .join(db.SeriesResult)
            .where(db.SeriesResult.series_id.in_(expired))
            .distinct()
        ).all()
    removed = 0
    for instance_id, sop_uid, path in instances:
        # Under the instance's lock, and only if nothing came since: a resend
        # of the image (or of another of its series) keeps it.
        with spool.instance_lock(sop_uid), db.transaction(sessions) as session:
            still_expired = session.scalar(
                select(db.Instance.id)
                .join(db.Series)
                .where(
                    db.Instance.id == instance_id,
                    db.Instance.path == path,
                    db.Series.state.in_(db.FINISHED),
                    db.Series.last_received_at < cutoff,
                )
            )
            if still_expired is None:
                continue
            # The file goes before the row is committed: a crash in between
            # leaves a row without its file (harmless), never a file without
            # a row, which the start-up re-index would bring back as a newly
            # received image.
            spool.remove(path)
            session.execute(delete(db.Instance).where(db.Instance.id == instance_id))
            removed += 1
    for relative in reports:
        if spool.absolute(relative).exists():  # several deliveries share one file
            spool.remove(relative)
            removed += 1
    logger.info("retention: removed %d files of %d series older than %d days", removed, len(expired), retention_days)
    return removed
