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
from sqlalchemy import select, update
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
    now = db.utcnow()
    with db.transaction(factory) as session:
        series = session.scalars(select(db.Series).where(db.Series.series_uid == header.series_uid)).one_or_none()
        if series is None:
            series = db.Series(
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
            session.add(series)
            session.flush()
        instance = session.scalars(
            select(db.Instance).where(db.Instance.sop_instance_uid == header.sop_instance_uid)
        ).one_or_none()
        replaced_path = None
        duplicate = instance is not None
        if instance is None:
            instance = db.Instance(sop_instance_uid=header.sop_instance_uid, times_received=1)
            session.add(instance)
            series.instance_count += 1
        else:
            instance.times_received += 1
            if instance.path != path:
                replaced_path = instance.path
            if instance.series_id != series.id:
                old = session.get(db.Series, instance.series_id)
                if old is not None:
                    old.instance_count -= 1
                series.instance_count += 1
            logger.info(
                "duplicate SOP Instance UID %s from %s (received %d times), keeping the newer copy",
                header.sop_instance_uid,
                calling_ae,
                instance.times_received,
            )
        instance.sop_class_uid = header.sop_class_uid
        instance.transfer_syntax_uid = header.transfer_syntax_uid
        instance.series_id = series.id
        instance.path = path
        instance.size_bytes = size_bytes
        instance.instance_number = header.instance_number
        instance.calling_ae = calling_ae
        instance.peer_host = peer_host
        instance.received_at = now
        instance.quarantine_reason = None
        series.last_received_at = now
        if series.state != db.RECEIVING:
            # Late slices: complete and score the series again later.
            series.state = db.RECEIVING
            series.claimed_at = None
        session.flush()
        return Registration(instance.id, series.id, duplicate, replaced_path)


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
        for series_id, series_uid, count in rows:
            # The state condition makes this safe against a slice arriving
            # (or another node completing it) since the select above.
            session.execute(
                update(db.Series)
                .where(
                    db.Series.id == series_id,
                    db.Series.state == db.RECEIVING,
                    db.Series.last_received_at <= cutoff,
                )
                .values(state=db.COMPLETE, completed_at=now, version=db.Series.version + 1)
            )
            logger.info("series %s complete with %d instances", series_uid, count)
    return [series_uid for _, series_uid, _ in rows]
