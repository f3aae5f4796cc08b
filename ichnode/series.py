"""Series assembly: instances grouped by study and series, and series completion.

A series is complete once ``series.stable_seconds`` pass with no new
instance. Completion is decided from the database alone, so it survives
restarts and works for a series that arrives over several associations (or
several receiver processes).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.tag import Tag
from sqlalchemy import Connection, case, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from . import db

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceHeader:
    """What the receiver records of an instance, read from its header."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    modality: str | None = None
    instance_number: int | None = None
    patient_id: str | None = None
    accession_number: str | None = None
    series_number: str | None = None
    series_description: str | None = None
    body_part: str | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset, *, sop_class_uid: str, sop_instance_uid: str) -> InstanceHeader:
        """Build from a header; raises ``ValueError`` naming a missing Type 1 UID.

        ``sop_class_uid`` and ``sop_instance_uid`` come from the C-STORE request
        and are used when the dataset lacks them (RSNA files keep the SOP Class
        UID only in the file meta).
        """
        meta = getattr(ds, "file_meta", Dataset())
        uids = {
            "SOPInstanceUID": _text(ds.get("SOPInstanceUID")) or sop_instance_uid,
            "SOPClassUID": _text(ds.get("SOPClassUID")) or sop_class_uid,
            "StudyInstanceUID": _text(ds.get("StudyInstanceUID")),
            "SeriesInstanceUID": _text(ds.get("SeriesInstanceUID")),
        }
        for keyword, uid in uids.items():
            if not uid:
                raise ValueError(f"{keyword} {Tag(keyword)} is missing or empty")
            # A UID cut to fit would be another image's: refused, not clipped.
            if len(uid) > _UID_LENGTH:
                raise ValueError(f"{keyword} is {len(uid)} characters, more than {_UID_LENGTH}")
        # Free text is cut to what its column holds: a server database
        # (PostgreSQL) refuses longer values, where SQLite would keep them.
        columns = db.Series.__table__.c
        return cls(
            sop_instance_uid=uids["SOPInstanceUID"],
            sop_class_uid=uids["SOPClassUID"],
            study_uid=uids["StudyInstanceUID"],
            series_uid=uids["SeriesInstanceUID"],
            transfer_syntax_uid=_text(meta.get("TransferSyntaxUID"), _UID_LENGTH) or "",
            modality=_text(ds.get("Modality"), columns.modality.type.length),
            instance_number=_int(ds.get("InstanceNumber")),
            patient_id=_text(ds.get("PatientID"), columns.patient_id.type.length),
            accession_number=_text(ds.get("AccessionNumber"), columns.accession_number.type.length),
            series_number=_text(ds.get("SeriesNumber"), columns.series_number.type.length),
            series_description=_text(ds.get("SeriesDescription"), columns.series_description.type.length),
            body_part=_text(ds.get("BodyPartExamined"), columns.body_part.type.length),
        )


# What the UID columns hold: twice a valid UID's 64, for the non-conformant.
_UID_LENGTH = 128
# What an Integer column holds on every database.
_INT_RANGE = range(-(2**31), 2**31)


def _text(value: object, limit: int | None = None) -> str | None:
    """Stripped text without NULs (a server database refuses them), at most ``limit`` characters;
    a multi-valued one as DICOM writes it, its values joined by backslashes."""
    if value is None:
        return None
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):  # a MultiValue
        value = "\\".join(str(v) for v in value)  # not str(), a Python list: "['A', 'B']"
    text = str(value).replace("\x00", "").strip()
    return text[:limit] or None


def _int(value: object) -> int | None:
    try:
        number = int(str(value)) if value not in (None, "") else None
    except ValueError:
        return None
    return number if number is None or number in _INT_RANGE else None


@dataclass(frozen=True)
class Registration:
    instance_id: int
    series_id: int
    duplicate: bool
    # Spool path of an older copy of the same SOP Instance UID that now lies
    # elsewhere (its series UID changed) and can be deleted.
    replaced_path: str | None
    # An identical copy of the recorded file (its bytes, or its data set in another encoding): only counted, the file stays.
    identical: bool = False


def register_instance(
    factory: sessionmaker[Session],
    header: InstanceHeader,
    *,
    path: str,
    size_bytes: int,
    calling_ae: str | None,
    peer_host: str | None,
    identical_to_stored: bool = False,
) -> Registration:
    """Record one received instance and touch its series, in one transaction.

    A duplicate SOP Instance UID replaces the older row (the newer file is
    kept) and increments ``times_received``. A series that was already
    complete goes back to ``receiving`` so it is completed and scored again;
    so does a series an instance moved out of. ``identical_to_stored``: the
    file at ``path`` holds these very bytes already; when the row says it is
    this instance's file, the copy is only counted (see :func:`_count_identical_copy`).
    """
    for attempt in range(3):
        try:
            return _register(factory, header, path, size_bytes, calling_ae, peer_host, identical_to_stored)
        except IntegrityError:
            # Another association created the same series or instance between
            # our read and our insert; the retry sees its row.
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _register(
    factory: sessionmaker[Session],
    header: InstanceHeader,
    path: str,
    size_bytes: int,
    calling_ae: str | None,
    peer_host: str | None,
    identical_to_stored: bool,
) -> Registration:
    # Core statements rather than ORM objects: this runs once per received
    # image on the association thread, and the ORM would triple its cost.
    now = db.utcnow()
    series_t = db.Series.__table__
    instance_t = db.Instance.__table__
    with db.transaction(factory) as session:
        conn = session.connection()
        if identical_to_stored:
            counted = _count_identical_copy(conn, header, path, calling_ae)
            if counted is not None:
                return counted
        series = conn.execute(
            select(series_t.c.id, series_t.c.study_uid, series_t.c.patient_id).where(
                series_t.c.series_uid == header.series_uid
            )
        ).first()
        series_id = series.id if series is not None else None
        identity = {}
        # An image without a PatientID is taken to be the series' patient.
        patient_id = header.patient_id or (series.patient_id if series is not None else None)
        if series is not None and (series.study_uid, series.patient_id) != (header.study_uid, patient_id):
            # The PACS re-filed the series (a corrected patient or study) and
            # sends it again: the series goes by its newest identity. Images of
            # another study or patient than most of it stay out of its volume
            # (selection.stray_slices).
            identity = dict(study_uid=header.study_uid, patient_id=patient_id, accession_number=header.accession_number)
            logger.warning(
                "series %s now arrives as study %s, patient %s (was study %s, patient %s)",
                header.series_uid,
                header.study_uid,
                patient_id,
                series.study_uid,
                series.patient_id,
            )
        if series_id is None:
            series_id = conn.execute(
                insert(series_t).values(
                    series_uid=header.series_uid,
                    study_uid=header.study_uid,
                    patient_id=header.patient_id,
                    accession_number=header.accession_number,
                    modality=header.modality,
                    series_number=header.series_number,
                    series_description=header.series_description,
                    body_part=header.body_part,
                    calling_ae=calling_ae,
                    peer_host=peer_host,
                    state=db.RECEIVING,
                    instance_count=0,
                    first_received_at=now,
                    last_received_at=now,
                    version=0,
                )
            ).inserted_primary_key[0]
        fields = dict(
            sop_class_uid=header.sop_class_uid,
            transfer_syntax_uid=header.transfer_syntax_uid,
            series_id=series_id,
            path=path,
            size_bytes=size_bytes,
            instance_number=header.instance_number,
            calling_ae=calling_ae,
            peer_host=peer_host,
            received_at=now,
            quarantine_reason=None,
        )
        existing = conn.execute(
            select(instance_t.c.id, instance_t.c.path, instance_t.c.series_id, instance_t.c.times_received).where(
                instance_t.c.sop_instance_uid == header.sop_instance_uid
            )
        ).first()
        replaced_path = None
        if existing is None:
            instance_id = conn.execute(
                insert(instance_t).values(sop_instance_uid=header.sop_instance_uid, times_received=1, **fields)
            ).inserted_primary_key[0]
            added = 1
        else:
            instance_id = existing.id
            conn.execute(
                update(instance_t)
                .where(instance_t.c.id == existing.id)
                .values(times_received=existing.times_received + 1, **fields)
            )
            replaced_path = existing.path if existing.path != path else None
            added = 0
            if existing.series_id != series_id:
                _move_out(conn, existing.series_id, header, now)
                added = 1
            logger.info(
                "duplicate SOP Instance UID %s from %s (received %d times), keeping the newer copy",
                header.sop_instance_uid,
                calling_ae,
                existing.times_received + 1,
            )
        sender = {}
        if calling_ae:
            # A series whose first image came without a sender (re-indexed at
            # start after a crash) takes the next one's: reports return to it.
            # (Both read the row as it was: the sender is set as a pair.)
            unknown = series_t.c.calling_ae.is_(None)
            sender = dict(
                calling_ae=case((unknown, calling_ae), else_=series_t.c.calling_ae),
                peer_host=case((unknown, peer_host), else_=series_t.c.peer_host),
            )
        # Back to receiving even if it was complete or scored: late slices
        # make the series complete (and scored) again, as a new version.
        conn.execute(
            update(series_t)
            .where(series_t.c.id == series_id)
            .values(
                instance_count=series_t.c.instance_count + added,
                last_received_at=now,
                state=db.RECEIVING,
                claimed_at=None,
                **identity,
                **sender,
            )
        )
        return Registration(instance_id, series_id, existing is not None, replaced_path)


def _count_identical_copy(
    conn: Connection, header: InstanceHeader, path: str, calling_ae: str | None
) -> Registration | None:
    """Count an identical resend of a recorded instance (a routing rule
    that fired twice, a study sent again) and change nothing else: its series
    keeps its state and version, so it is not scored and reported again
    (only its time of last receipt moves), unless it failed or was skipped,
    or its reports could not be built.
    None when the row does not say that ``path`` in this series is the
    instance's file (then it is recorded as any other copy)."""
    series_t = db.Series.__table__
    instance_t = db.Instance.__table__
    row = conn.execute(
        select(instance_t.c.id, instance_t.c.series_id, instance_t.c.times_received)
        .join(series_t, series_t.c.id == instance_t.c.series_id)
        .where(
            instance_t.c.sop_instance_uid == header.sop_instance_uid,
            instance_t.c.path == path,
            series_t.c.series_uid == header.series_uid,
            # A series that failed or was skipped, or whose reports could not
            # be built, is tried again when its study is sent again (after a
            # fix of the node, its settings or its disk).
            series_t.c.state.not_in((db.FAILED, db.SKIPPED)),
            ~db.reports_not_built(series_t.c.id),
        )
    ).first()
    if row is None:
        return None
    conn.execute(
        update(instance_t).where(instance_t.c.id == row.id).values(times_received=instance_t.c.times_received + 1)
    )
    # Received now, all the same: retention, which deletes what has not
    # come for its days, must not take an image it has just acknowledged.
    conn.execute(update(series_t).where(series_t.c.id == row.series_id).values(last_received_at=db.utcnow()))
    logger.info(
        "identical copy of %s from %s (received %d times); its series is unchanged",
        header.sop_instance_uid,
        calling_ae,
        row.times_received + 1,
    )
    return Registration(row.id, row.series_id, duplicate=True, replaced_path=None, identical=True)


def _move_out(conn: Connection, series_id: int, header: InstanceHeader, now: dt.datetime) -> None:
    """The instance now belongs to another series: the one it left goes back to
    receiving, so that a result of it being made now is superseded and it is
    completed and scored again without the instance (a series left empty is
    completed with none, and its next result says why it is not scored)."""
    series_t = db.Series.__table__
    conn.execute(
        update(series_t)
        .where(series_t.c.id == series_id)
        .values(
            instance_count=series_t.c.instance_count - 1,
            last_received_at=now,
            state=db.RECEIVING,
            claimed_at=None,
        )
    )
    logger.info(
        "instance %s moved to series %s; the series it left is completed and scored again",
        header.sop_instance_uid,
        header.series_uid,
    )


def complete_stable_series(
    factory: sessionmaker[Session], stable_seconds: float, *, now: dt.datetime | None = None
) -> list[str]:
    """Mark complete every receiving series quiet for ``stable_seconds``; returns their UIDs."""
    now = now or db.utcnow()
    cutoff = now - dt.timedelta(seconds=stable_seconds)
    with db.transaction(factory) as session:
        rows = session.execute(
            select(db.Series.id, db.Series.series_uid, db.Series.instance_count).where(
                db.Series.state == db.RECEIVING, db.Series.last_received_at <= cutoff
            )
        ).all()
        completed = []
        for series_id, series_uid, count in rows:
            # The state condition makes this safe against a slice arriving
            # (or another node completing it) since the select above.
            won = session.execute(
                update(db.Series)
                .where(
                    db.Series.id == series_id,
                    db.Series.state == db.RECEIVING,
                    db.Series.last_received_at <= cutoff,
                )
                .values(state=db.COMPLETE, completed_at=now, version=db.Series.version + 1)
            ).rowcount
            if won:
                logger.info("series %s complete with %d instances", series_uid, count)
                completed.append(series_uid)
    return completed


def restamp_future_receipts(factory: sessionmaker[Session], *, now: dt.datetime | None = None) -> int:
    """After the system clock went back: a series still receiving whose last
    image is stamped later than now would wait until the clock caught up
    before it is complete. It is stamped now instead; returns how many."""
    now = now or db.utcnow()
    with db.transaction(factory) as session:
        return session.execute(
            update(db.Series)
            .where(db.Series.state == db.RECEIVING, db.Series.last_received_at > now)
            .values(last_received_at=now)
        ).rowcount


@dataclass
class ScoreAgain:
    """What :func:`score_again` did with each series it was given (by UID)."""

    queued: list[str]
    pending: list[str]  # receiving, complete or being scored: scored anyway
    images_gone: list[tuple[str, str]]  # (series UID, why it cannot be scored again)


def series_to_score_again(
    session: Session, uids: Sequence[str] = (), *, failed: bool = False, unreported: bool = False
) -> list[int]:
    """Ids of the series named (study or series UIDs, or their ends), of every
    failed series with ``failed``, and of every series scored whose reports
    could not be built with ``unreported``. A UID the database does not know
    is a LookupError; the end of several UIDs a ValueError."""
    ids: list[int] = []
    for uid in uids:
        found = db.find_series(session, uid)
        if not found:
            raise LookupError(f"no study or series {uid!r} in the database")
        ids += found
    if failed:
        ids += session.scalars(select(db.Series.id).where(db.Series.state == db.FAILED).order_by(db.Series.id))
    if unreported:
        ids += unreported_series(session)
    return list(dict.fromkeys(ids))


# How many times the node itself scores again a series whose reports could
# not be built, each time the spool has room; then only ``ichnode rescore``.
REPORTS_TRIES = 3


def unreported_series(session: Session, *, tried_fewer_than: int | None = None) -> list[int]:
    """Ids of the series whose current result was scored but its reports could
    not be built; with ``tried_fewer_than``, only those with fewer such results."""
    query = select(db.Series.id).where(db.reports_not_built(db.Series.id)).order_by(db.Series.id)
    if tried_fewer_than is not None:
        tries = (
            select(func.count())
            .select_from(db.SeriesResult)
            .where(
                db.SeriesResult.series_id == db.Series.id,
                db.SeriesResult.skip_reason.startswith(db.REPORTS_NOT_BUILT, autoescape=True),
            )
            .scalar_subquery()
        )
        query = query.where(tries < tried_fewer_than)
    return list(session.scalars(query))


def score_again(factory: sessionmaker[Session], series_ids: list[int], *, now: dt.datetime | None = None) -> ScoreAgain:
    """Make finished series complete again, as if their last image had just
    arrived: the worker scores each as a new version from the images the
    spool holds, and that result and its reports supersede the current ones.

    Its images' quarantine reasons are cleared, so each is judged afresh (a
    decoder installed since reads it; a bad file is quarantined again). A
    series retention removed images of is not queued: a version of what is
    left would not be the whole series."""
    now = now or db.utcnow()
    done = ScoreAgain([], [], [])
    with db.transaction(factory) as session:
        for series_id in series_ids:
            series = session.get(db.Series, series_id)
            if series.state not in db.FINISHED:
                done.pending.append(series.series_uid)
                continue
            why = _images_gone(session, series)
            if why:
                done.images_gone.append((series.series_uid, why))
                continue
            # The state condition makes this safe against images arriving meanwhile.
            won = session.execute(
                update(db.Series)
                .where(db.Series.id == series_id, db.Series.state.in_(db.FINISHED))
                .values(state=db.COMPLETE, completed_at=now, claimed_at=None, version=db.Series.version + 1)
            ).rowcount
            if not won:
                done.pending.append(series.series_uid)
                continue
            session.execute(
                update(db.Instance).where(db.Instance.series_id == series_id).values(quarantine_reason=None)
            )
            logger.info("series %s queued to be scored again", series.series_uid)
            done.queued.append(series.series_uid)
    return done


def _images_gone(session: Session, series: db.Series) -> str | None:
    """Why ``series`` cannot be scored again from the spool, or None."""
    if not session.scalar(select(db.Instance.id).where(db.Instance.series_id == series.id).limit(1)):
        return "none of its images are kept (storage.retention_days removed them, or they moved to another series)"
    current = db.current_scored_result(session, series.id)
    removed = db.slices_removed(session, current.id) if current else 0
    if removed:
        return f"storage.retention_days removed {removed} of the images its result was scored from"
    return None
