"""``ichnode results``: what the node concluded, answered from the database.

Each row is one series: its newest result (scored, skipped or failed), or its
state while it is still being received or scored, with the delivery state of
its reports.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
from collections.abc import Sequence
from typing import Any

from sqlalchemy import case, func, or_, select
from sqlalchemy.orm import Session, aliased, selectinload

from . import db
from .config import LABELS

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# A series on its way to a new result: its row shows that state, not the result so far.
_PENDING = (db.RECEIVING, db.COMPLETE, db.PROCESSING)
# What a spreadsheet takes for the start of a formula, in a cell of a CSV.
_FORMULA_STARTS = ("=", "+", "-", "@")


def parse_since(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """``30m``, ``2h``, ``7d``, ``4w`` (ago) or an ISO date/time (UTC) -> naive UTC datetime."""
    now = now or db.utcnow()
    match = _DURATION.match(text.strip())
    if match:
        try:
            return now - dt.timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
        except OverflowError:
            raise ValueError(f"--since {text!r} reaches back before the year 1") from None
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since expects e.g. 30m, 2h, 7d, 4w or an ISO time, got {text!r}") from None
    if value.tzinfo is not None:
        try:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        except OverflowError:
            raise ValueError(f"--since {text!r} is out of the range of dates") from None
    return value


def _latest_result(series: db.Series) -> db.SeriesResult | None:
    # Not superseded: a version made of images that arrived after retention
    # removed the series' own leaves the full series' result current.
    current = [r for r in series.results if not r.superseded]
    pool = current or series.results
    return max(pool, key=lambda r: r.id) if pool else None


def series_summary(series: db.Series, *, with_slices: bool = False) -> dict[str, Any]:
    result = _latest_result(series)
    # While a newer version is on its way, the row says so rather than
    # showing the older result as if it were current.
    pending = result is None or series.state in _PENDING
    row: dict[str, Any] = {
        "study_uid": series.study_uid,
        "series_uid": series.series_uid,
        "accession_number": series.accession_number,
        "series_number": series.series_number,
        "series_description": series.series_description,
        "calling_ae": series.calling_ae,
        "instances": series.instance_count,
        "received_at": _iso(series.last_received_at),
        "status": series.state if pending else result.status,
        "version": result.version if result else None,
        "skip_reason": result.skip_reason if result else None,
        "model": f"{result.model_name} {result.model_version}" if result and result.model_name else None,
        "scores": dict(result.scores) if result and result.scores else {},
        "flags": dict(result.flags) if result and result.flags else {},
        "thresholds": dict(result.thresholds) if result and result.thresholds else {},
        "key_sop_instance_uid": result.key_sop_instance_uid if result else None,
        "slices_scored": result.slice_count if result else 0,
        "slices_quarantined": result.quarantined_count if result else 0,
        "scored_at": _iso(result.created_at) if result else None,
        "delivery": [
            {
                "kind": d.kind,
                "sop_instance_uid": d.sop_instance_uid,
                "destination": f"{d.ae_title}@{d.host}:{d.port}",
                "state": d.state,
                "attempts": d.attempts,
                "last_error": d.last_error,
                "sent_at": _iso(d.sent_at),
            }
            for d in (result.deliveries if result else [])
        ],
    }
    if with_slices:
        # Which images were left out, and why: what to fix or send again.
        row["quarantined"] = [
            {"sop_instance_uid": i.sop_instance_uid, "instance_number": i.instance_number, "reason": i.quarantine_reason}
            for i in sorted(series.instances, key=lambda i: i.id)
            if i.quarantine_reason
        ]
    if with_slices and result is not None:
        row["slices"] = [
            {"sop_instance_uid": s.sop_instance_uid, "position": s.position, "scores": s.scores}
            for s in sorted(result.slices, key=lambda s: s.position)
        ]
    return row


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") + "Z" if value else None


def _query():
    return select(db.Series).options(
        selectinload(db.Series.results).selectinload(db.SeriesResult.deliveries)
    )


def _current_result_id() -> Any:
    """The id of the result :func:`_latest_result` picks, for a query of series."""

    def newest(*conditions: Any) -> Any:
        query = select(func.max(db.SeriesResult.id)).where(db.SeriesResult.series_id == db.Series.id, *conditions)
        return query.scalar_subquery()

    return func.coalesce(newest(db.SeriesResult.superseded.is_(False)), newest())


def _kept(query: Any, *, positive: bool, since: dt.datetime | None, statuses: Sequence[str]) -> Any:
    """``query`` (of series) with the filters of :func:`list_results`, in
    SQL: a year of series is too many to read only to drop most of them."""
    if since is not None:
        query = query.where(db.Series.last_received_at >= since)
    if not (positive or statuses):
        return query
    result = aliased(db.SeriesResult)
    query = query.outerjoin(result, result.id == _current_result_id())
    if statuses:
        # The status as series_summary shows it.
        shown = case((or_(result.id.is_(None), db.Series.state.in_(_PENDING)), db.Series.state), else_=result.status)
        query = query.where(shown.in_(statuses))
    if positive:
        query = query.where(or_(*(result.flags[label].as_boolean() for label in LABELS)))
    return query


def list_results(
    session: Session,
    *,
    positive: bool = False,
    since: dt.datetime | None = None,
    statuses: Sequence[str] = (),
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """One summary per series, newest first, at most ``limit``; ``statuses``
    keeps those whose ``status`` (as the summary shows it) is one of them,
    ``positive`` those whose result flags a finding."""
    query = _kept(_query(), positive=positive, since=since, statuses=statuses)
    query = query.order_by(db.Series.last_received_at.desc(), db.Series.id.desc()).limit(limit)
    return [series_summary(series) for series in session.scalars(query)]


def count_results(
    session: Session, *, positive: bool = False, since: dt.datetime | None = None, statuses: Sequence[str] = ()
) -> int:
    """How many series :func:`list_results` lists when it has no ``limit``."""
    kept = _kept(select(db.Series.id), positive=positive, since=since, statuses=statuses)
    return session.scalar(select(func.count()).select_from(kept.subquery())) or 0


def show_results(session: Session, uid: str) -> list[dict[str, Any]]:
    """Every series of a study (given its Study Instance UID), or the one
    series given; ``uid`` may be the end of one (:func:`db.find_series`)."""
    query = _query().options(
        selectinload(db.Series.results).selectinload(db.SeriesResult.slices), selectinload(db.Series.instances)
    ).where(db.Series.id.in_(db.find_series(session, uid)))
    return [series_summary(series, with_slices=True) for series in session.scalars(query)]


def _delivery_text(row: dict[str, Any]) -> str:
    states = [d["state"] for d in row["delivery"]]
    if not states:
        return ""
    return ", ".join(f"{state} {states.count(state)}" for state in sorted(set(states)))


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    flat = {
        "study_uid": row["study_uid"],
        "series_uid": row["series_uid"],
        "accession_number": row["accession_number"] or "",
        "series_description": row["series_description"] or "",
        "status": row["status"],
        "version": row["version"] or "",
        "skip_reason": row["skip_reason"] or "",
        "positive": ",".join(label for label in LABELS if row["flags"].get(label)),
    }
    for label in LABELS:
        flat[label] = _series_score(row, label)
    flat["delivery"] = _delivery_text(row)
    return flat


def format_results(rows: list[dict[str, Any]], fmt: str) -> str:
    """Render as ``json``, ``csv`` or an aligned ``table``."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    flat = [_flat(row) for row in rows]
    if fmt == "csv":
        return _csv(list(_flat(_EMPTY).keys()), flat)
    if fmt != "table":
        raise ValueError(f"format must be table, json or csv, got {fmt!r}")
    if not flat:
        return "no series"
    columns = ["series_uid", "series_description", "status", "any", "positive", "delivery", "skip_reason"]
    shown = [{c: str(r[c]) for c in columns} for r in flat]
    for r in shown:
        # Long UIDs and reasons would push the scores off the screen.
        r["series_uid"] = r["series_uid"] if len(r["series_uid"]) <= 28 else "..." + r["series_uid"][-25:]
        r["delivery"] = r["delivery"] or "-"  # no report
    return _table(columns, shown)


def format_show(rows: list[dict[str, Any]], fmt: str) -> str:
    """:func:`format_results`; a table also lists each series' reports and
    slices, and a CSV has each series' row followed by a row per slice."""
    if fmt == "csv":
        return _show_csv(rows)
    if fmt != "table" or not rows:
        return format_results(rows, fmt)
    parts = [format_results(rows, fmt)]
    for row in rows:
        parts.append(_one_line(f"series {row['series_uid']} ({row['status']}, version {row['version'] or '-'})"))
        if row["delivery"]:
            deliveries = [
                {
                    "report": d["kind"],
                    "destination": d["destination"],
                    "state": d["state"],
                    "attempts": str(d["attempts"]),
                    "last_error": d["last_error"] or "",
                }
                for d in row["delivery"]
            ]
            parts.append(_table(list(deliveries[0]), deliveries))
        slices = [
            {
                "slice": str(s["position"]),
                "sop_instance_uid": s["sop_instance_uid"],
                **{label: _score(s["scores"].get(label)) for label in LABELS},
            }
            for s in row.get("slices", [])
        ]
        if slices:
            parts.append(_table(list(slices[0]), slices))
        left_out = [
            {
                "left out": q["sop_instance_uid"],
                "instance": "" if q["instance_number"] is None else str(q["instance_number"]),
                "reason": q["reason"],
            }
            for q in row.get("quarantined", [])
        ]
        if left_out:
            parts.append(_table(list(left_out[0]), left_out))
    return "\n\n".join(parts)


def _show_csv(rows: list[dict[str, Any]]) -> str:
    # One table for a spreadsheet or pandas: the ``level`` column tells a
    # series' own scores from its slices'.
    fieldnames = ["level", "slice", "sop_instance_uid", *_flat(_EMPTY).keys(), "quarantine_reason"]
    lines: list[dict[str, Any]] = []
    for row in rows:
        series = _flat(row)
        lines.append({**series, "level": "series"})
        for s in row.get("slices", []):
            lines.append(
                {
                    "level": "slice",
                    "slice": s["position"],
                    "sop_instance_uid": s["sop_instance_uid"],
                    "study_uid": series["study_uid"],
                    "series_uid": series["series_uid"],
                    "version": series["version"],
                    **{label: _score(s["scores"].get(label)) for label in LABELS},
                }
            )
        for q in row.get("quarantined", []):
            lines.append(
                {
                    "level": "quarantined",
                    "sop_instance_uid": q["sop_instance_uid"],
                    "study_uid": series["study_uid"],
                    "series_uid": series["series_uid"],
                    "quarantine_reason": q["reason"],
                }
            )
    return _csv(fieldnames, lines)


def _csv(fieldnames: list[str], rows: list[dict[str, Any]]) -> str:
    """CSV text. A cell that begins like a formula (= + - @) gets a quote
    before it, or a spreadsheet would run it: header values come from outside
    the hospital's control."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fieldnames, restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _not_a_formula(value) for key, value in row.items()})
    return out.getvalue().rstrip("\n")


def _not_a_formula(value: Any) -> Any:
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA_STARTS) else value


def _score(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def shown_scores(probability: float, threshold: float, present: bool) -> tuple[str, str]:
    """A finding's probability and threshold to 0.001, as printed everywhere
    (``results``, the summary image): rounded, except that an absent
    finding's probability never reads as much as its threshold (0.5552
    absent at 0.55548 reads 0.554, not 0.555). Rounding alone keeps a present
    one at or above its threshold."""
    shown, shown_threshold = round(probability, 3), round(threshold, 3)
    if not present and shown >= shown_threshold:
        shown = max(shown_threshold - 0.001, 0.0)
    return f"{shown:.3f}", f"{shown_threshold:.3f}"


def _series_score(row: dict[str, Any], label: str) -> str:
    probability, threshold = row["scores"].get(label), row.get("thresholds", {}).get(label)
    if probability is None or threshold is None:
        return _score(probability)
    return shown_scores(probability, threshold, bool(row["flags"].get(label)))[0]


def _one_line(text: str) -> str:
    """``text`` with control characters (a newline in a header value) as spaces, so that it keeps to its line."""
    return text if text.isprintable() else "".join(c if c.isprintable() else " " for c in text)


def _table(columns: list[str], rows: list[dict[str, str]]) -> str:
    """Aligned columns under an upper-case header, a line a row."""
    rows = [{c: _one_line(r[c]) for c in columns} for r in rows]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns).rstrip() for r in rows]
    return "\n".join(lines)


_EMPTY: dict[str, Any] = {
    "study_uid": "",
    "series_uid": "",
    "accession_number": None,
    "series_description": None,
    "status": "",
    "version": None,
    "skip_reason": None,
    "flags": {},
    "scores": {},
    "delivery": [],
}
