"""Retention: finished series lose their files after storage.retention_days; results stay."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select, update

from ichnode import db
from ichnode.retention import purge_expired

from .conftest import all_instances, require_data, store_files, wait_for


def _finish(node: Any) -> db.Series:
    with db.transaction(node.sessions) as session:
        session.execute(update(db.Series).values(state=db.SCORED))
        return session.scalars(select(db.Series)).one()


def test_purge_removes_files_of_finished_old_series_only(start_node: Any) -> None:
    node = start_node()
    files = sorted(require_data("ge-head-ct").glob("*.dcm"))[:3]
    assert store_files(node.port, files) == [0, 0, 0]
    wait_for(lambda: len(all_instances(node)) == 3, message="3 instances")
    spooled = [node.spool.absolute(i.path) for i in all_instances(node)]
    assert all(path.is_file() for path in spooled)

    # Still receiving: kept, however old.
    later = db.utcnow() + dt.timedelta(days=30)
    assert purge_expired(node.sessions, node.spool, 7, now=later) == 0
    series = _finish(node)
    # Finished but younger than the retention: kept.
    assert purge_expired(node.sessions, node.spool, 7) == 0
    # Retention 0 keeps everything.
    assert purge_expired(node.sessions, node.spool, 0, now=later) == 0

    assert purge_expired(node.sessions, node.spool, 7, now=later) == 3
    assert not any(path.exists() for path in spooled)
    assert all_instances(node) == []
    with node.sessions() as session:
        kept = session.get(db.Series, series.id)
        assert kept is not None and kept.state == db.SCORED
