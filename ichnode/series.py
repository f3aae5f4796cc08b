"""Series assembly: instances grouped by study and series, and series completion.

A series is complete once ``series.stable_seconds`` pass with no new
instance. Completion is decided from the database alone, so it survives
restarts and works for a series that arrives over several associations (or
several receiver processes).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from pydicom.dataset import Dataset
from sqlalchemy import insert, select, update
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
        study = _text(ds.get("StudyInstanceUID"))
        series = _text(ds.get("SeriesInstanceUID"))
        if not study:
            raise ValueError("StudyInstanceUID (0020,000D) is missing or empty")
        if not series:
            raise ValueError("SeriesInstanceUID (0020,000E) is missing or empty")
        meta = getattr(ds, "file_meta", Dataset())
        return cls(
            sop_instance_uid=_text(ds.get("SOPInstanceUID")) or sop_instance_uid,
            sop_class_uid=_text(ds.get("SOPClassUID")) or sop_class_uid,
            study_uid=study,
            series_uid=series,
            transfer_syntax_uid=_text(meta.get("TransferSyntaxUID")) or "",
            modality=_text(ds.get("Modality")),
            instance_number=_int(ds.get("InstanceNumber")),
            patient_id=_text(ds.get("PatientID")),
            accession_number=_text(ds.get("AccessionNumber")),
            series_number=_text(ds.get("SeriesNumber")),
            series_description=_text(ds.get("SeriesDescription")),
            body_part=_text(ds.get("BodyPartExamined")),
        )


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip().strip("\x00")
    return text or None


def _int(value: object) -> int | None:
    try:
        return int(str(value)) if value not in (None, "") else None
    except ValueError:
        return None


@dataclass(frozen=True)
class Registration:
    instance_id: int
    series_id: int
    duplicate: bool
    # Spool path of an older copy of the same SOP Instance UID that now lies
    # elsewhere (its series UID changed) and can be deleted.
    replaced_path: str | None


def register_instance(
    factory: sessionmaker[Session],
    header: InstanceHeader,
    *,
    path: str,
    size_bytes: int,
    calling_ae: str | None,
    peer_host: str | None,
) -> Registration:
    """Record one received instance and touch its series, in one transaction.

    A duplicate SOP Instance UID replaces the older row (the newer file is
    kept) and increments ``times_received``. A series that was already
    complete goes back to ``receiving`` so it is completed and scored again.
    """
    for attempt in range(3):
        try:
            return _register(factory, header, path, size_bytes, calling_ae, peer_host)
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
) -> Registration:
    # Core statements rather than ORM objects: this runs once per received
    # image on the association thread, and the ORM would triple its cost.
    now = db.utcnow()
    series_t = db.Series.__table__
    instance_t = db.Instance.__table__
    with db.transaction(factory) as session:
        conn = session.connection()
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
                # Same SOP Instance UID now in another series: move it.
                conn.execute(
                    update(series_t)
                    .where(series_t.c.id == existing.series_id)
                    .values(instance_count=series_t.c.instance_count - 1)
                )
                added = 1
            logger.info(
                "duplicate SOP Instance UID %s from %s (received %d times), keeping the newer copy",
                header.sop_instance_uid,
                calling_ae,
                existing.times_received + 1,
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
            )
        )
        return Registration(instance_id, series_id, existing is not None, replaced_path)


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
