"""``ichnode rescore``: series scored again from their spooled images, as a
new version whose result and reports supersede the current ones."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydicom.uid import Comprehensive3DSRStorage

from ichnode import db
from ichnode.retention import purge_expired
from ichnode.series import REPORTS_TRIES
from ichnode.status import collect_status, format_status
from ichnode.worker import Worker
from tests.conftest import all_series, run_cli, store_files, wait_series_state
from tests.pipeline_support import (
    PIPELINE_WARNINGS,
    Nodes,
    phantom,
    results_of,
    shared_model,
    wait_deliveries,
    wait_result,
)

pytestmark = PIPELINE_WARNINGS


def _uid(ds: Any, keyword: str = "SeriesInstanceUID") -> str:
    return str(ds[keyword].value)


def _rescore(config_path: Any, *args: str) -> list[str]:
    done = run_cli(["rescore", "--config", str(config_path), *args])
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_a_series_whose_reports_could_not_be_built_is_reported_once_mended(nodes: Nodes, recorder: Any) -> None:
    # `rescore --unreported` has the running node score it again and deliver its reports.
    pacs = recorder()
    series = phantom(70)
    series_uid = _uid(series.datasets[0])
    node, blocker, path = _unreported(nodes, series, pacs.destination)
    v1 = results_of(node.sessions, series_uid)[0]
    assert "ichnode rescore --unreported" in format_status(collect_status(node.config))

    blocker.unlink()
    assert _rescore(path, "--unreported") == ["queued 1 series to be scored again"]
    v2 = wait_result(node.sessions, series_uid, version=2)
    assert (v2.status, v2.skip_reason, v2.scores) == (db.SCORED, None, v1.scores)
    wait_deliveries(node.sessions, lambda rows: [r.state for r in rows] == [db.SENT] * 2, message="v2 delivered")
    assert {r.dataset.SeriesDescription for r in pacs.stored()} >= {"ICH AI results v2"}
    assert results_of(node.sessions, series_uid)[0].superseded
    assert collect_status(node.config)["scored_without_reports"] == 0
    # Nothing left to do: a second run queues nothing.
    assert _rescore(path, "--unreported") == ["queued 0 series to be scored again"]


def test_the_node_itself_reports_a_series_once_its_reports_can_be_built(nodes: Nodes, recorder: Any) -> None:
    pacs = recorder()
    series = phantom(76)
    node, blocker, _ = _unreported(nodes, series, pacs.destination)
    # No room in the spool: no try.
    room = node.spool.min_free_mb
    node.spool.min_free_mb = 2**40
    assert node.score_unreported_again() == 0
    node.spool.min_free_mb = room
    blocker.unlink()
    assert node.score_unreported_again() == 1
    v2 = wait_result(node.sessions, _uid(series.datasets[0]), version=2)
    assert (v2.status, v2.skip_reason) == (db.SCORED, None)
    wait_deliveries(node.sessions, lambda rows: [r.state for r in rows] == [db.SENT] * 2, message="delivered")
    assert {r.dataset.SeriesDescription for r in pacs.stored()} >= {"ICH AI results v2"}


def test_the_node_tries_to_build_a_series_reports_a_bounded_number_of_times(nodes: Nodes) -> None:
    series = phantom(77)
    series_uid = _uid(series.datasets[0])
    node, _, _ = _unreported(nodes, series, {"ae_title": "PACS", "host": "127.0.0.1", "port": 9})
    # The cause lasting, each try is one more such result, up to the tries allowed.
    for version in range(2, REPORTS_TRIES + 1):
        assert node.score_unreported_again() == 1
        assert wait_result(node.sessions, series_uid, version=version).skip_reason.startswith(db.REPORTS_NOT_BUILT)
    assert node.score_unreported_again() == 0
    assert f"({REPORTS_TRIES} tries in all)" in format_status(collect_status(node.config))


def _unreported(nodes: Nodes, series: Any, destination: dict[str, Any]) -> tuple[Any, Any, Any]:
    """A running node that scored ``series`` but could not build its reports
    (a file is where the study's report folder goes); returns (node, that
    file, the node's config file)."""
    path, config = nodes.config(reports={"destinations": [destination]})
    node = nodes.start(config)
    study_uid = _uid(series.datasets[0], "StudyInstanceUID")
    blocker = node.spool.absolute(node.spool.report_path(study_uid, "x")).parent
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_bytes(b"")
    assert store_files(node.port, series.datasets) == [0x0000] * len(series.datasets)
    assert wait_result(node.sessions, _uid(series.datasets[0]), version=1).skip_reason.startswith(db.REPORTS_NOT_BUILT)
    return node, blocker, path


def test_a_study_named_by_the_end_of_its_uid_gets_a_new_sr_naming_the_one_the_pacs_holds(
    nodes: Nodes, recorder: Any
) -> None:
    pacs = recorder()
    series = phantom(71)
    series_uid, study_uid = _uid(series.datasets[0]), _uid(series.datasets[0], "StudyInstanceUID")
    path, config = nodes.config(reports={"destinations": [pacs.destination]})
    node = nodes.start(config)
    assert store_files(node.port, series.datasets) == [0x0000] * len(series.datasets)
    wait_result(node.sessions, series_uid, version=1)
    wait_deliveries(node.sessions, lambda rows: [r.state for r in rows] == [db.SENT] * 2, message="v1 delivered")

    assert _rescore(path, "..." + study_uid[-20:]) == ["queued 1 series to be scored again"]
    wait_result(node.sessions, series_uid, version=2)
    wait_deliveries(node.sessions, lambda rows: [r.state for r in rows] == [db.SENT] * 4, message="v2 delivered")
    stored = [r.dataset for r in pacs.stored()]
    srs = {ds.SeriesDescription: ds for ds in stored if ds.SOPClassUID == Comprehensive3DSRStorage}
    assert set(srs) == {"ICH AI results v1", "ICH AI results v2"}
    (study,) = srs["ICH AI results v2"].PredecessorDocumentsSequence
    (named,) = [sop.ReferencedSOPInstanceUID for s in study.ReferencedSeriesSequence for sop in s.ReferencedSOPSequence]
    assert named == srs["ICH AI results v1"].SOPInstanceUID


def test_failed_series_are_scored_again_with_their_quarantine_judged_afresh(nodes: Nodes) -> None:
    series = phantom(72)
    series_uid = _uid(series.datasets[0])
    path, config = nodes.config(reports={"destinations": []})
    receiver = nodes.start(config, components=("receiver",))
    assert store_files(receiver.port, series.datasets) == [0x0000] * len(series.datasets)
    wait_series_state(receiver, series_uid, db.COMPLETE)
    # A slice quarantined for a cause since mended, and a model that fails.
    with db.transaction(receiver.sessions) as session:
        slice_row = session.query(db.Instance).order_by(db.Instance.id).first()
        slice_row.quarantine_reason = "cannot decode pixels: no decoder"

    def broken(*_args: Any) -> Any:
        raise ValueError("no scores")

    _one_round(config, receiver, score=broken)
    (failed,) = results_of(receiver.sessions, series_uid)
    assert failed.status == db.FAILED
    assert "ichnode rescore --failed" in format_status(collect_status(config))

    assert _rescore(path, "--failed") == ["queued 1 series to be scored again"]
    _one_round(config, receiver)
    _, scored = results_of(receiver.sessions, series_uid)
    assert (scored.version, scored.status) == (2, db.SCORED)
    assert (scored.slice_count, scored.quarantined_count) == (len(series.datasets), 0)
    assert "rescore" not in format_status(collect_status(config))


def test_what_cannot_be_scored_again_is_named_and_left_as_it_is(nodes: Nodes) -> None:
    kept, purged, receiving = phantom(73), phantom(74), phantom(75)
    path, config = nodes.config(reports={"destinations": []})
    receiver = nodes.start(config, components=("receiver",))
    for series in (kept, purged):
        assert store_files(receiver.port, series.datasets) == [0x0000] * len(series.datasets)
        wait_series_state(receiver, _uid(series.datasets[0]), db.COMPLETE)
        _one_round(config, receiver)
    # Retention removes the images of one (its row and result stay).
    with db.transaction(receiver.sessions) as session:
        session.query(db.Series).filter(db.Series.series_uid == _uid(purged.datasets[0])).update(
            {"last_received_at": db.utcnow() - dt.timedelta(days=30)}
        )
    assert purge_expired(receiver.sessions, receiver.spool, 7) == len(purged.datasets)
    assert store_files(receiver.port, receiving.datasets[:3]) == [0x0000] * 3

    names = [_uid(s.datasets[0]) for s in (kept, purged, receiving)]
    assert _rescore(path, *names) == [
        "queued 1 series to be scored again",
        f"not queued, it is being received or scored already: {names[2]}",
        "not queued, none of its images are kept (storage.retention_days removed them, or they moved to "
        f"another series): {names[1]}",
    ]
    states = {s.series_uid: s.state for s in all_series(receiver)}
    assert (states[names[0]], states[names[1]]) == (db.COMPLETE, db.SCORED)
    assert states[names[2]] in (db.RECEIVING, db.COMPLETE)  # complete already, on a slow machine

    unknown = run_cli(["rescore", "--config", str(path), "1.2.3.4.5"])
    assert (unknown.returncode, unknown.stderr.strip()) == (1, "Error: no study or series '1.2.3.4.5' in the database")
    nothing = run_cli(["rescore", "--config", str(path)])
    assert nothing.returncode == 2
    assert "name series or studies by UID, or give --failed or --unreported" in nothing.stderr


def _one_round(config: Any, receiver: Any, score: Any = None) -> None:
    """One round of a new worker, which handles one series (``score``: in place of its scoring)."""
    worker = Worker(config, receiver.sessions, receiver.spool, shared_model())
    if score:
        worker._score = score
    try:
        assert worker.run_once() == 1
    finally:
        worker.close()
