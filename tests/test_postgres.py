"""The node on a real PostgreSQL server (``database.url`` takes any SQLAlchemy URL).

One throwaway cluster serves the whole module (tests/postgres_support.py: a
Unix socket in a temporary folder, no TCP); each test gets a new, empty
database of its own.  What SQLite lets pass and PostgreSQL does not is
checked here: values longer than their columns, a NUL inside a text, numbers
beyond 32 bits, tables created by several processes at once.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage
from sqlalchemy import make_url

from ichnode import db
from ichnode.config import LABELS
from tests.conftest import DATA, config_data, run_cli, store_files, write_config
from tests.pipeline_support import (
    PIPELINE_WARNINGS,
    Nodes,
    evidence_series,
    phantom,
    sr_findings,
    wait_deliveries,
    wait_result,
)
from tests.postgres_support import POSTGRES_TOOLS, Postgres, open_together, postgres_server

pytestmark = [*PIPELINE_WARNINGS, pytest.mark.tools(*POSTGRES_TOOLS), pytest.mark.slow]


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    yield from postgres_server()


@pytest.fixture
def database_url(postgres: Postgres, request: pytest.FixtureRequest) -> str:
    """A new, empty database for this test."""
    return postgres.new_database(request.node.name)


def _all_sent(count: int) -> Callable[[list[db.Delivery]], bool]:
    return lambda rows: len(rows) == count and all(r.state == db.SENT for r in rows)


def _cli_json(config_path: Path, *args: str) -> Any:
    """What ``ichnode ARGS --config CONFIG_PATH`` prints, as JSON."""
    out = run_cli([*args, "--config", str(config_path)])
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_node_on_postgresql_scores_and_reports_and_the_commands_read_it(
    database_url: str, nodes: Nodes, recorder: Any
) -> None:
    pacs = recorder()
    case = phantom(61)
    sent = {str(case.datasets[0].SeriesInstanceUID): list(case.datasets)}
    ge_folder = DATA / "ge-head-ct"
    if ge_folder.is_dir():  # the real series too, where the shared data is
        ge = [pydicom.dcmread(path) for path in sorted(ge_folder.glob("*.dcm"))]
        sent[str(ge[0].SeriesInstanceUID)] = ge
    config_path, config = nodes.config(database={"url": database_url}, reports={"destinations": [pacs.destination]})
    node = nodes.start(config)
    for datasets in sent.values():
        assert store_files(node.port, datasets) == [0x0000] * len(datasets)
    for series_uid, datasets in sent.items():
        result = wait_result(node.sessions, series_uid, instances=len(datasets))
        assert result.status == db.SCORED, result.skip_reason
    wait_deliveries(node.sessions, _all_sent(2 * len(sent)), message="every report delivered")

    # The PACS got an SR and a summary image in each source's study.
    reports: dict[str, dict[str, pydicom.Dataset]] = {uid: {} for uid in sent}
    for record in pacs.stored():
        ds = record.dataset
        (source,) = [uid for uid, datasets in sent.items() if datasets[0].StudyInstanceUID == ds.StudyInstanceUID]
        reports[source][record.sop_class_uid] = ds
    for series_uid, by_class in reports.items():
        assert sorted(by_class) == sorted([Comprehensive3DSRStorage, SecondaryCaptureImageStorage]), series_uid
        assert series_uid in evidence_series(by_class[Comprehensive3DSRStorage])

    # The administrators' commands read the same from the PostgreSQL database.
    status = _cli_json(config_path, "status", "--json")
    assert make_url(status["database"]) == make_url(database_url)  # the socket folder written %2F-quoted
    assert status["instances"]["total"] == sum(map(len, sent.values()))
    assert status["series"] == {db.SCORED: len(sent)}
    assert status["deliveries"] == {db.SENT: 2 * len(sent)}

    rows = {row["series_uid"]: row for row in _cli_json(config_path, "results", "list", "--format", "json")}
    assert sorted(rows) == sorted(sent)
    for series_uid, row in rows.items():
        assert row["status"] == "scored" and list(row["scores"]) == list(LABELS)
        assert sorted(d["kind"] for d in row["delivery"]) == ["sr", "summary"]
        assert all(d["state"] == "sent" and d["destination"].startswith("TEST_PACS@") for d in row["delivery"])
        findings = sr_findings(reports[series_uid][Comprehensive3DSRStorage])
        for label in LABELS:  # the SR says what the database holds
            assert findings[label]["probability"] == pytest.approx(row["scores"][label], abs=1e-3), label
            assert findings[label]["present"] == row["flags"][label], label

    phantom_uid = str(case.datasets[0].SeriesInstanceUID)
    (shown,) = _cli_json(config_path, "results", "show", phantom_uid[-12:], "--format", "json")
    assert shown["series_uid"] == phantom_uid and shown["scores"] == rows[phantom_uid]["scores"]
    assert sorted(s["sop_instance_uid"] for s in shown["slices"]) == sorted(
        str(ds.SOPInstanceUID) for ds in case.datasets
    )


def test_header_values_longer_than_the_columns_are_stored_and_scored(
    database_url: str, nodes: Nodes, recorder: Any
) -> None:
    # Real scanners and PACS send these; SQLite keeps them as they are, so
    # PostgreSQL must take them too, not answer "out of resources" for ever.
    pacs = recorder()
    description = ("AXIAL HEAD WO THIN 0.625MM BONE+SOFT " * 4)[:140]
    case = phantom(62)
    for number, ds in enumerate(case.datasets):
        ds.SeriesDescription = description
        ds.AccessionNumber = "A" * 70
        ds.PatientID = "PAT\x00123"
        ds.InstanceNumber = 20240101001 + number
    series_uid = str(case.datasets[0].SeriesInstanceUID)
    config_path, config = nodes.config(database={"url": database_url}, reports={"destinations": [pacs.destination]})
    node = nodes.start(config)

    assert store_files(node.port, case.datasets) == [0x0000] * len(case.datasets)
    result = wait_result(node.sessions, series_uid, instances=len(case.datasets))
    assert result.status == db.SCORED, result.skip_reason
    wait_deliveries(node.sessions, _all_sent(2), message="the reports of the series delivered")
    assert len(pacs.stored()) == 2

    (shown,) = _cli_json(config_path, "results", "show", series_uid, "--format", "json")
    assert shown["status"] == "scored" and len(shown["slices"]) == len(case.datasets)
    # The description whole, or cut where its column ends.
    assert len(shown["series_description"]) >= 64 and description.startswith(shown["series_description"])


def test_processes_starting_together_on_a_new_database_all_open_it(postgres: Postgres) -> None:
    # Stages started as separate processes (systemd units at boot) create the
    # tables of a new database at the same moment (SQLite: tests/test_service.py).
    urls = [postgres.new_database(f"together {attempt}") for attempt in range(4)]
    for url, outcomes in open_together(urls, processes=3).items():
        failures = [detail for state, detail in outcomes if state != "ok"]
        assert failures == [], url
        installations = {detail for _, detail in outcomes}
        assert len(installations) == 1 and len(installations.pop()) == 32, outcomes


def test_check_config_refuses_a_model_version_longer_than_the_database_keeps(tmp_path: Path, database_url: str) -> None:
    # A card's version is free text (training's export.version); every result
    # records it, and PostgreSQL refuses what does not fit.
    from ichnode.model import card_path_for, default_model_path

    bundled = default_model_path()
    model = tmp_path / "models" / "site.keras"
    model.parent.mkdir()
    shutil.copyfile(bundled, model)
    card = json.loads(card_path_for(bundled).read_text())
    card["version"] = "2026.11.28-finetune-siteA-head-ct-thin-slices-ablation-run17-seed3-v02"
    assert len(card["version"]) == 70
    card_path_for(model).write_text(json.dumps(card))
    path = write_config(
        tmp_path / "node.yaml", config_data(tmp_path, database={"url": database_url}, model={"path": str(model)})
    )

    checked = run_cli(["check-config", "--config", str(path)])
    assert checked.returncode == 1, checked.stdout
    assert "version" in checked.stderr and str(card_path_for(model)) in checked.stderr, checked.stderr
    assert "Traceback" not in checked.stderr
