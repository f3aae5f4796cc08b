"""Retention: spooled images and report files are deleted ``storage.retention_days``
after their series last changed, once the series is finished (scored, skipped
or failed) and its reports are no longer waiting to be sent.

The series, its results and the delivery history stay in the database; only
the image files and their instance rows go, and the folders they leave empty.
Images of the series that arrive later do not replace its result unless they
are all of it again (the worker's ``_older_result_stands``).
``retention_days: 0`` keeps everything.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from . import db
from .spool import Spool

logger = logging.getLogger(__name__)

_IDS_PER_QUERY = 1000


def purge_expired(
    sessions: sessionmaker[Session], spool: Spool, retention_days: int, *, now: dt.datetime | None = None
) -> int:
    """Delete the files of finished series older than the retention; returns how many files.

    A run logs the series it removed files of, not every series purged before."""
    if retention_days <= 0:
        return 0
    cutoff = (now or db.utcnow()) - dt.timedelta(days=retention_days)
    with db.transaction(sessions) as session:
        waiting = select(db.SeriesResult.series_id).join(db.Delivery).where(db.Delivery.state.in_(db.UNDELIVERED))
        # With images, or with reports whose files may be left: a series whose
        # images all moved to another series keeps the reports it was sent.
        has_images = select(db.Instance.id).where(db.Instance.series_id == db.Series.id).exists()
        has_reports = (
            select(db.SeriesResult.id).join(db.Delivery).where(db.SeriesResult.series_id == db.Series.id).exists()
        )
        expired = session.scalars(
            select(db.Series.id).where(
                db.Series.state.in_(db.FINISHED),
                db.Series.last_received_at < cutoff,
                db.Series.id.not_in(waiting),
                has_images | has_reports,
            )
        ).all()
        instances, reports = [], []
        # In parts: a server database takes a bounded number of parameters per statement.
        for start in range(0, len(expired), _IDS_PER_QUERY):
            part = expired[start : start + _IDS_PER_QUERY]
            instances += session.execute(
                select(db.Instance.id, db.Instance.sop_instance_uid, db.Instance.path, db.Instance.series_id).where(
                    db.Instance.series_id.in_(part)
                )
            ).all()
            reports += session.execute(
                select(db.Delivery.path, db.SeriesResult.series_id)
                .join(db.SeriesResult)
                .where(db.SeriesResult.series_id.in_(part))
                .distinct()
            ).all()
    purged: set[int] = set()
    removed = 0
    # Report files first: a crash before the images are gone leaves the series
    # with images, so the next run selects it again and finishes.
    for relative, series_id in reports:
        if spool.absolute(relative).exists():  # several deliveries share one file
            spool.remove(relative, remove_empty_folders=True)
            purged.add(series_id)
            removed += 1
    for instance_id, sop_uid, path, series_id in instances:
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
            spool.remove(path, remove_empty_folders=True)
            session.execute(delete(db.Instance).where(db.Instance.id == instance_id))
            purged.add(series_id)
            removed += 1
    if purged:
        logger.info("retention: removed %d files of %d series older than %d days", removed, len(purged), retention_days)
    return removed
