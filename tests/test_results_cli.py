"""``ichnode results``: what an administrator reads, from a database a real node filled.

One node (in this process, every component, the shared model) receives the
real GE series, a phantom series and a phantom too short to score, and
delivers its reports to a recording SCP; then it stops and the CLI runs as a
subprocess against its configuration file.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest

from ichnode import db
from ichnode.config import LABELS
from tests.conftest import config_data, require_data, run_cli, store_files, write_config
from tests.pipeline_support import (
    PIPELINE_WARNINGS,
    Nodes,
    Recorder,
    phantom,
    wait_deliveries,
    wait_result,
)

pytestmark = PIPELINE_WARNINGS

KEYS = {"study_uid", "series_uid", "status", "skip_reason", "scores", "flags", "delivery"}


@dataclass
class Filled:
    config: Path
    ge_study: str
    ge_series: str
    scored: str  # the phantom scored
    skipped: str  # the phantom with too few slices


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Filled]:
    ge_files = sorted(require_data("ge-head-ct").glob("*.dcm"))
    ge = pydicom.dcmread(ge_files[0], stop_before_pixels=True)
    scored, short = phantom(41), phantom(42, n_slices=5)
    pacs = Recorder().start()
    nodes = Nodes(tmp_path_factory.mktemp("results"))
    try:
        # "any" at threshold 0 flags every scored series, so --positive has
        # something to keep and something (the skipped series) to drop.
        config_path, config = nodes.config(
            reports={"destinations": [pacs.destination]}, model={"thresholds": {"any": 0.0}}
        )
        node = nodes.start(config)
        for datasets in (ge_files, scored.datasets, short.datasets):
            assert set(store_files(node.port, datasets)) == {0x0000}
        for series_uid, count in (
            (str(ge.SeriesInstanceUID), 28),
            (str(scored.datasets[0].SeriesInstanceUID), len(scored.datasets)),
            (str(short.datasets[0].SeriesInstanceUID), 5),
        ):
            wait_result(node.sessions, series_uid, instances=count)
        wait_deliveries(
            node.sessions,
            lambda rows: len(rows) == 4 and all(r.state == db.SENT for r in rows),
            message="the reports of both scored series delivered",
        )
    finally:
        nodes.close()
        pacs.stop()
    yield Filled(
        config_path,
        str(ge.StudyInstanceUID),
        str(ge.SeriesInstanceUID),
        str(scored.datasets[0].SeriesInstanceUID),
        str(short.datasets[0].SeriesInstanceUID),
    )


def _results(filled: Filled, *args: str) -> str:
    out = run_cli(["results", *args, "--config", str(filled.config)])
    assert out.returncode == 0, out.stderr
    return out.stdout


def _json(filled: Filled, *args: str) -> list[dict]:
    return json.loads(_results(filled, "list", "--format", "json", *args))


def test_list_json_has_one_object_per_series(filled: Filled) -> None:
    rows = _json(filled)
    assert isinstance(rows, list) and len(rows) == 3
    assert all(KEYS <= set(row) for row in rows)
    by_series = {row["series_uid"]: row for row in rows}
    assert sorted(by_series) == sorted([filled.ge_series, filled.scored, filled.skipped])

    for uid in (filled.ge_series, filled.scored):
        row = by_series[uid]
        assert row["status"] == "scored" and row["skip_reason"] is None
        assert list(row["scores"]) == list(LABELS)
        assert all(0.0 <= value <= 1.0 for value in row["scores"].values())
        assert set(row["flags"]) == set(LABELS) and all(isinstance(v, bool) for v in row["flags"].values())
        assert row["flags"]["any"] is True  # threshold 0 from the configuration
        assert sorted(d["kind"] for d in row["delivery"]) == ["sr", "summary"]
        assert {d["state"] for d in row["delivery"]} == {"sent"}
        assert all(d["destination"].startswith("TEST_PACS@127.0.0.1:") for d in row["delivery"])
    assert by_series[filled.ge_series]["study_uid"] == filled.ge_study

    skipped = by_series[filled.skipped]
    assert skipped["status"] == "skipped"
    assert skipped["skip_reason"] == "5 slices, fewer than series.min_slices (10)"
    assert skipped["scores"] == {} and skipped["flags"] == {} and skipped["delivery"] == []


def test_list_positive_keeps_only_flagged_series(filled: Filled) -> None:
    everything = _json(filled)
    positive = _json(filled, "--positive")
    assert positive == [row for row in everything if any(row["flags"].values())]
    assert {row["series_uid"] for row in positive} == {filled.ge_series, filled.scored}


def test_list_status_keeps_only_series_of_those_statuses(filled: Filled) -> None:
    assert [row["series_uid"] for row in _json(filled, "--status", "skipped")] == [filled.skipped]
    both = _json(filled, "--status", "skipped", "--status", "scored")
    assert sorted(row["series_uid"] for row in both) == sorted([filled.ge_series, filled.scored, filled.skipped])
    assert _json(filled, "--status", "failed") == []
    bad = run_cli(["results", "list", "--status", "done", "--config", str(filled.config)])
    assert bad.returncode == 2 and "'done' is none of receiving, complete, processing, scored" in bad.stderr


def test_list_since(filled: Filled) -> None:
    assert len(_json(filled, "--since", "1h")) == 3
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).replace(tzinfo=None).isoformat(timespec="seconds")
    assert _json(filled, "--since", future) == []
    bad = run_cli(["results", "list", "--since", "yesterday", "--config", str(filled.config)])
    assert bad.returncode != 0 and "--since" in bad.stderr
    assert len(_json(filled, "--since", "2w")) == 3


def test_list_since_further_back_than_dates_go_is_a_usage_error(filled: Filled) -> None:
    out = run_cli(["results", "list", "--since", "1000000d", "--config", str(filled.config)])
    assert out.returncode == 2
    assert "Invalid value for --since: --since '1000000d' reaches back before the year 1" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("text", "back"),
    [
        ("45s", dt.timedelta(seconds=45)),
        ("30m", dt.timedelta(minutes=30)),
        ("2h", dt.timedelta(hours=2)),
        ("1.5d", dt.timedelta(hours=36)),
        ("4w", dt.timedelta(weeks=4)),
    ],
)
def test_since_reads_each_unit(text: str, back: dt.timedelta) -> None:
    from ichnode.results import parse_since

    now = dt.datetime(2026, 1, 10, 12, 0, 0)
    assert parse_since(text, now=now) == now - back
    assert parse_since("2026-01-09T12:00:00+02:00", now=now) == dt.datetime(2026, 1, 9, 10, 0, 0)


def test_since_at_the_edge_of_the_dates_is_an_error_not_a_crash() -> None:
    from ichnode.results import parse_since

    for text in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):
        with pytest.raises(ValueError, match="out of the range of dates"):
            parse_since(text)


def test_list_csv_has_a_header_and_a_row_per_series(filled: Filled) -> None:
    text = _results(filled, "list", "--format", "csv")
    reader = csv.DictReader(io.StringIO(text))
    assert {"study_uid", "series_uid", "status", "skip_reason", *LABELS, "delivery"} <= set(reader.fieldnames)
    rows = {row["series_uid"]: row for row in reader}
    assert len(text.strip().splitlines()) == 1 + 3
    assert sorted(rows) == sorted([filled.ge_series, filled.scored, filled.skipped])
    assert rows[filled.skipped]["status"] == "skipped" and rows[filled.skipped]["any"] == ""
    assert rows[filled.scored]["status"] == "scored" and 0.0 <= float(rows[filled.scored]["any"]) <= 1.0
    assert rows[filled.scored]["delivery"] == "sent 2"


def test_list_table(filled: Filled) -> None:
    lines = _results(filled, "list").splitlines()
    assert lines[0].split()[:3] == ["SERIES_UID", "SERIES_DESCRIPTION", "STATUS"]
    assert len(lines) == 1 + 3


def test_show_a_study_and_a_series(filled: Filled) -> None:
    (study,) = json.loads(_results(filled, "show", filled.ge_study, "--format", "json"))
    assert study["series_uid"] == filled.ge_series
    assert [s["position"] for s in study["slices"]] == list(range(28))
    assert all(list(s["scores"]) == list(LABELS) for s in study["slices"])

    (series,) = json.loads(_results(filled, "show", filled.skipped, "--format", "json"))
    assert series["status"] == "skipped" and series["slices"] == []


def test_show_table_has_reports_and_per_slice_scores(filled: Filled) -> None:
    (series,) = json.loads(_results(filled, "show", filled.ge_series, "--format", "json"))
    lines = _results(filled, "show", filled.ge_series).splitlines()
    assert lines[0].split()[:3] == ["SERIES_UID", "SERIES_DESCRIPTION", "STATUS"]
    assert f"series {filled.ge_series} (scored, version 1)" in lines

    header = lines.index(next(line for line in lines if line.startswith("REPORT")))
    assert lines[header].split() == ["REPORT", "DESTINATION", "STATE", "ATTEMPTS", "LAST_ERROR"]
    reports = [line.split() for line in lines[header + 1 : header + 3]]
    assert sorted(r[0] for r in reports) == ["sr", "summary"]
    for report in reports:
        assert report[1].startswith("TEST_PACS@127.0.0.1:") and report[2:] == ["sent", "1"]

    header = lines.index(next(line for line in lines if line.startswith("SLICE")))
    assert lines[header].split() == ["SLICE", "SOP_INSTANCE_UID", *(label.upper() for label in LABELS)]
    slices = [line.split() for line in lines[header + 1 :]]
    assert len(slices) == 28
    for shown, stored in zip(slices, series["slices"], strict=True):
        assert shown[:2] == [str(stored["position"]), stored["sop_instance_uid"]]
        assert [float(v) for v in shown[2:]] == pytest.approx([stored["scores"][label] for label in LABELS], abs=5e-4)


def test_show_csv_has_the_series_then_a_row_per_slice(filled: Filled) -> None:
    (study,) = json.loads(_results(filled, "show", filled.ge_study, "--format", "json"))
    rows = list(csv.DictReader(io.StringIO(_results(filled, "show", filled.ge_study, "--format", "csv"))))
    assert [r["level"] for r in rows] == ["series"] + ["slice"] * 28
    assert rows[0]["series_uid"] == filled.ge_series and rows[0]["status"] == "scored"
    assert float(rows[0]["any"]) == pytest.approx(study["scores"]["any"], abs=5e-4)
    for row, stored in zip(rows[1:], study["slices"], strict=True):
        assert (row["series_uid"], row["slice"], row["sop_instance_uid"]) == (
            filled.ge_series,
            str(stored["position"]),
            stored["sop_instance_uid"],
        )
        assert [float(row[label]) for label in LABELS] == pytest.approx(
            [stored["scores"][label] for label in LABELS], abs=5e-4
        )

    (skipped,) = csv.DictReader(io.StringIO(_results(filled, "show", filled.skipped, "--format", "csv")))
    assert skipped["level"] == "series" and skipped["status"] == "skipped" and skipped["skip_reason"]


def test_show_an_unknown_uid_fails_clearly(filled: Filled) -> None:
    out = run_cli(["results", "show", "1.2.3.4.5.6.7", "--config", str(filled.config)])
    assert out.returncode != 0
    assert "no study or series '1.2.3.4.5.6.7' in the database" in out.stderr


def test_a_score_beside_its_threshold_reads_as_the_summary_image_has_it() -> None:
    from ichnode.results import _EMPTY, format_results

    row = {
        **_EMPTY,
        "series_uid": "1.2.3",
        "status": "scored",
        "scores": {"any": 0.5552, "subdural": 0.867203},
        "thresholds": {"any": 0.55548, "subdural": 0.49237},
        "flags": {"any": False, "subdural": True},
    }
    (parsed,) = csv.DictReader(io.StringIO(format_results([row], "csv")))
    # Absent: never as much as its threshold (0.555); elsewhere plain rounding.
    assert (parsed["any"], parsed["subdural"], parsed["positive"]) == ("0.554", "0.867", "subdural")


def test_show_takes_the_end_of_a_uid_as_the_list_table_prints_it(filled: Filled) -> None:
    lines = _results(filled, "list").splitlines()
    (shown,) = [line.split()[0] for line in lines[1:] if filled.scored.endswith(line.split()[0].removeprefix("..."))]
    assert shown.startswith("...")  # the table shortens a long UID
    full = json.loads(_results(filled, "show", filled.scored, "--format", "json"))
    assert json.loads(_results(filled, "show", shown, "--format", "json")) == full
    assert json.loads(_results(filled, "show", shown.removeprefix("..."), "--format", "json")) == full


def test_show_says_when_the_end_of_a_uid_is_the_end_of_several(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'ichnode.db'}")
    db.init_db(engine)
    with db.transaction(db.session_factory(engine)) as session:
        session.add(db.Series(series_uid="1.2.3.1045", study_uid="1.2.3"))
        session.add(db.Series(series_uid="1.2.7.2045", study_uid="1.2.7"))
        session.add(db.Series(series_uid="IDX0099", study_uid="ID_9"))  # "_" is no wildcard
    engine.dispose()
    path = write_config(tmp_path / "node.yaml", config_data(tmp_path))

    def show(uid: str) -> Any:
        return run_cli(["results", "show", uid, "--config", str(path), "--format", "json"])

    out = show("045")
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        "Error: '045' is the end of 2 study or series UIDs (1.2.3.1045, 1.2.7.2045); give more of it"
    ]
    out = show("...1045")
    assert out.returncode == 0, out.stderr
    assert [row["series_uid"] for row in json.loads(out.stdout)] == ["1.2.3.1045"]
    out = show("D_0099")
    assert out.returncode == 1 and "no study or series 'D_0099' in the database" in out.stderr


# -- a database filled directly: many series, or header values from outside --
_RECEIVED = dt.datetime(2025, 11, 28, 8, 0, 0)


def _result(
    version: int, status: str = db.SCORED, *, positive: bool = False, superseded: bool = False
) -> db.SeriesResult:
    scored = status == db.SCORED
    return db.SeriesResult(
        version=version,
        status=status,
        skip_reason=None if scored else f"{status} for a test",
        scores={label: 0.9 if positive else 0.1 for label in LABELS} if scored else None,
        flags={label: positive and label == "any" for label in LABELS} if scored else None,
        thresholds={label: 0.5 for label in LABELS} if scored else None,
        superseded=superseded,
    )


def _series(n: int, state: str, *results: db.SeriesResult, **header: Any) -> db.Series:
    """Series ``n``, received ``n`` minutes after the first."""
    received = _RECEIVED + dt.timedelta(minutes=n)
    return db.Series(
        series_uid=f"1.2.826.0.1.{n}",
        study_uid=f"1.2.826.0.2.{n}",
        state=state,
        instance_count=40,
        first_received_at=received,
        last_received_at=received,
        version=len(results),
        results=list(results),
        **header,
    )


def _database(tmp_path: Path, series: list[db.Series]) -> Path:
    """The configuration of a node whose database holds ``series``."""
    engine = db.make_engine(f"sqlite:///{tmp_path / 'ichnode.db'}")
    db.init_db(engine)
    with db.transaction(db.session_factory(engine)) as session:
        session.add_all(series)
    engine.dispose()
    return write_config(tmp_path / "node.yaml", config_data(tmp_path))


def _cli(config: Path, *args: str) -> Any:
    out = run_cli(["results", *args, "--config", str(config)])
    assert out.returncode == 0, out.stderr
    return out


def test_status_and_positive_are_answered_by_the_database_not_by_reading_every_series(tmp_path: Path) -> None:
    # A year of series took 15-27 s and 0.8 GB to find the failed ones: each
    # was read, with its results and reports, to be dropped afterwards.
    from sqlalchemy import event

    from ichnode.results import list_results

    negative = [_series(n, db.SCORED, _result(1)) for n in range(300)]
    failed = _series(300, db.FAILED, _result(1, db.FAILED))
    positive = _series(301, db.SCORED, _result(1, positive=True))
    # Images after retention: their version is recorded superseded, the full series' result stays current.
    stands = _series(302, db.SKIPPED, _result(1, positive=True), _result(2, db.SKIPPED, superseded=True))
    # Being received again: shown as such, with the flags of its result so far.
    again = _series(303, db.RECEIVING, _result(1, positive=True))
    _database(tmp_path, [*negative, failed, positive, stands, again])

    engine = db.make_engine(f"sqlite:///{tmp_path / 'ichnode.db'}")
    read: list[str] = []

    def count_read(series: db.Series, context: Any) -> None:
        read.append(series.series_uid)

    def listed(**filters: Any) -> list[str]:
        read.clear()
        with db.session_factory(engine)() as session:
            uids = [row["series_uid"] for row in list_results(session, **filters)]
        assert sorted(read) == sorted(uids)  # no series read only to be left out
        return uids

    event.listen(db.Series, "load", count_read)
    try:
        assert listed(statuses=[db.FAILED]) == [failed.series_uid]
        assert listed(positive=True) == [again.series_uid, stands.series_uid, positive.series_uid]
        assert listed(positive=True, statuses=[db.SCORED]) == [stands.series_uid, positive.series_uid]
        assert listed(statuses=[db.SKIPPED]) == []
        assert listed(statuses=[db.RECEIVING, db.FAILED]) == [again.series_uid, failed.series_uid]
        assert len(listed(statuses=[db.SCORED])) == 302
    finally:
        event.remove(db.Series, "load", count_read)
        engine.dispose()


def test_list_table_shows_the_newest_100_and_says_how_many_were_left_out(tmp_path: Path) -> None:
    config = _database(tmp_path, [_series(n, db.SCORED, _result(1)) for n in range(105)])
    lines = _cli(config, "list").stdout.splitlines()
    assert len(lines) == 1 + 100 + 1
    assert [line.split()[0] for line in lines[1:3]] == ["1.2.826.0.1.104", "1.2.826.0.1.103"]
    assert lines[-1] == "the newest 100 of 105 series; --limit 0 shows them all"
    assert len(_cli(config, "list", "--limit", "0").stdout.splitlines()) == 1 + 105

    # CSV and JSON, read by programs, hold every series unless told; the note
    # goes to stderr, so that what they read stays CSV or JSON.
    every = _cli(config, "list", "--format", "csv")
    assert len(every.stdout.splitlines()) == 1 + 105 and every.stderr == ""
    few = _cli(config, "list", "--format", "json", "--limit", "2")
    assert [row["series_uid"] for row in json.loads(few.stdout)] == ["1.2.826.0.1.104", "1.2.826.0.1.103"]
    assert few.stderr == "the newest 2 of 105 series; --limit 0 shows them all\n"

    bad = run_cli(["results", "list", "--limit", "-1", "--config", str(config)])
    assert bad.returncode == 2 and "--limit" in bad.stderr


def test_a_multi_valued_header_value_is_stored_as_dicom_writes_it() -> None:
    from pydicom.dataset import Dataset

    from ichnode.series import InstanceHeader

    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.4"
    ds.SeriesDescription, ds.AccessionNumber = "Schädel nativ\\axial", "A\\\\B"
    header = InstanceHeader.from_dataset(ds, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid="1.2.3.4.5")
    assert (header.series_description, header.accession_number) == ("Schädel nativ\\axial", "A\\\\B")


def test_header_text_neither_breaks_the_table_nor_becomes_a_spreadsheet_formula(tmp_path: Path) -> None:
    # Series description and accession number come from the scanner or PACS, beyond the hospital's control.
    odd = [
        ('HEAD, "plain"\nline2', "ACC,1"),
        ('=HYPERLINK("http://x","click")', "+123"),
        ("Schädel nativ\\axial", "A\\B"),
        ("-5 mm\tbone", "@SUM(A1)"),
    ]
    series = [
        _series(n, db.SCORED, _result(1), series_description=description, accession_number=accession)
        for n, (description, accession) in enumerate(odd)
    ]
    series[0].results[0].deliveries = [
        db.Delivery(
            kind="sr",
            sop_instance_uid="1.2.9",
            path="reports/x.dcm",
            ae_title="PACS",
            host="10.1.2.10",
            port=104,
            state=db.DEAD,
            attempts=3,
            last_error="refused:\r\nline two",
        )
    ]
    config = _database(tmp_path, series)
    newest_first = odd[::-1]

    table = _cli(config, "list").stdout.splitlines()
    assert len(table) == 1 + len(odd)  # one line a series: control characters read as spaces
    for line, shown in zip(table[1:], ["-5 mm bone", "Schädel nativ\\axial", '=HYPERLINK("http://x","click")']):
        assert shown in line
    assert 'HEAD, "plain" line2' in table[-1]
    report = _cli(config, "show", series[0].series_uid).stdout.splitlines()
    assert [line for line in report if line.startswith("sr ")][0].endswith("refused:  line two")
    assert not any(line.startswith("line two") for line in report)

    # A spreadsheet takes a cell that begins with = + - @ for a formula: a quote keeps it text.
    rows = list(csv.DictReader(io.StringIO(_cli(config, "list", "--format", "csv").stdout)))
    assert [(row["series_description"], row["accession_number"]) for row in rows] == [
        ("'-5 mm\tbone", "'@SUM(A1)"),
        ("Schädel nativ\\axial", "A\\B"),
        ("'=HYPERLINK(\"http://x\",\"click\")", "'+123"),
        ('HEAD, "plain"\nline2', "ACC,1"),
    ]
    (shown, *_) = csv.DictReader(io.StringIO(_cli(config, "show", series[1].series_uid, "--format", "csv").stdout))
    assert (shown["series_description"], shown["accession_number"]) == ("'" + odd[1][0], "'+123")

    # JSON is read by programs, not opened as a sheet: values as they are.
    rows = json.loads(_cli(config, "list", "--format", "json").stdout)
    assert [(row["series_description"], row["accession_number"]) for row in rows] == newest_first
