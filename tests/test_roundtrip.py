"""The real PACS round trip: Orthanc sends studies to ichnode, ichnode sends its reports back.

Orthanc (a real PACS, on free loopback ports, TCP_NODELAY=1) holds the real GE
head CT, a phantom study with hemorrhages and one without; it is asked over REST to send
each study to ichnode (registered as its modality "ichnode"); ichnode (in this
process, every component) scores them and stores its SR and summary image
back into Orthanc, where the test reads them through REST.
"""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from ichnode import db
from ichnode.config import LABELS
from ichnode.reports import report_uids
from tests.conftest import require_data, wait_for
from tests.peers import Orthanc
from tests.pipeline_support import (
    PIPELINE_WARNINGS,
    SCORE_TIMEOUT,
    Nodes,
    evidence_series,
    phantom,
    shared_model,
    sr_findings,
    wait_result,
    write_series,
)

pytestmark = [*PIPELINE_WARNINGS, pytest.mark.slow]


# The phantom with hemorrhages; the same case as the demo's positive study.
PHANTOM_SEED = 1001
PHANTOM_HEMORRHAGE = ("subdural", "intraparenchymal")


def _lookup(orthanc: Orthanc, uid: str, kind: str) -> str | None:
    """Orthanc's id of the study/series/instance with this DICOM UID, if it holds it."""
    found = [item["ID"] for item in orthanc.rest("POST", "/tools/lookup", uid) if item["Type"] == kind]
    return found[0] if found else None


@pytest.mark.tools("Orthanc")
def test_orthanc_sends_studies_and_gets_the_reports_back(tmp_path: Path, nodes: Nodes) -> None:
    ge_files = sorted(require_data("ge-head-ct").glob("*.dcm"))
    positive = phantom(PHANTOM_SEED, matrix=512, n_slices=None, hemorrhage=PHANTOM_HEMORRHAGE)
    assert positive.labels[:, LABELS.index("any")].any()
    negative = phantom(PHANTOM_SEED + 1, matrix=512, n_slices=None, hemorrhage=())
    assert not negative.labels.any()
    phantom_files = write_series(positive.datasets, tmp_path / "phantom")
    negative_files = write_series(negative.datasets, tmp_path / "negative")
    shared_model()  # loaded before any deadline runs

    with Orthanc(tmp_path / "orthanc") as orthanc:
        node = nodes.start(
            series={"stable_seconds": 2.0},
            reports={"destinations": [{"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}]},
        )
        orthanc.add_modality("ichnode", node.config.node.ae_title, "127.0.0.1", node.port)

        sources = {}
        files_of = {"ge": ge_files, "phantom": phantom_files, "negative": negative_files}
        for name, files in files_of.items():
            for path in files:
                orthanc.upload(path)
            header = pydicom.dcmread(files[0], stop_before_pixels=True)
            study_id = _lookup(orthanc, str(header.StudyInstanceUID), "Study")
            assert study_id is not None
            sources[name] = (header, study_id)
        assert orthanc.count_instances() == sum(map(len, files_of.values()))

        # The PACS routes each study to ichnode.
        for header, study_id in sources.values():
            orthanc.rest("POST", "/modalities/ichnode/store", {"Resources": [study_id], "Synchronous": True})

        reports = {}
        for name, (header, study_id) in sources.items():
            series_uid = str(header.SeriesInstanceUID)
            result = wait_result(node.sessions, series_uid, instances=len(files_of[name]))
            assert result.status == db.SCORED, result.skip_reason
            uids = report_uids(series_uid, result.version, installation=db.installation(node.sessions))

            def arrived(uids=uids) -> list[str] | None:
                found = [_lookup(orthanc, uid, "Series") for uid in (uids.sr_series_uid, uids.sc_series_uid)]
                return found if all(found) else None

            sr_series, sc_series = wait_for(
                arrived, timeout=SCORE_TIMEOUT, interval=0.2, message=f"the {name} reports in Orthanc"
            )
            # Orthanc files both reports under the source's study (same patient, same study UID).
            for series_id in (sr_series, sc_series):
                assert orthanc.rest("GET", f"/series/{series_id}")["ParentStudy"] == study_id
            source_series = _lookup(orthanc, series_uid, "Series")
            assert {source_series, sr_series, sc_series} <= set(orthanc.rest("GET", f"/studies/{study_id}")["Series"])

            (sr_instance,) = orthanc.rest("GET", f"/series/{sr_series}/instances")
            (sc_instance,) = orthanc.rest("GET", f"/series/{sc_series}/instances")
            sr = pydicom.dcmread(io.BytesIO(orthanc.rest("GET", f"/instances/{sr_instance['ID']}/file")))
            sc = pydicom.dcmread(io.BytesIO(orthanc.rest("GET", f"/instances/{sc_instance['ID']}/file")))
            assert (sr.SOPClassUID, sc.SOPClassUID) == (Comprehensive3DSRStorage, SecondaryCaptureImageStorage)
            for report in (sr, sc):
                assert report.StudyInstanceUID == header.StudyInstanceUID
                assert report.PatientID == header.PatientID
            assert series_uid in evidence_series(sr)
            findings = sr_findings(sr)
            assert sorted(findings) == sorted(LABELS), findings
            assert all(set(f) == {"present", "probability"} for f in findings.values())
            reports[name] = (findings, result)

    # The phantom's hemorrhage is found: "any" is Present with a probability at
    # or above the operating threshold. (GE has no labels: six findings suffice.)
    findings, result = reports["phantom"]
    threshold = result.thresholds["any"]
    assert findings["any"]["present"] is True, findings["any"]
    assert findings["any"]["probability"] >= threshold
    assert findings["any"]["probability"] == pytest.approx(result.scores["any"], abs=1e-6)
    # And a head without one is not flagged: nothing is Present.
    findings, result = reports["negative"]
    assert not any(finding["present"] for finding in findings.values()), findings
    assert findings["any"]["probability"] < result.thresholds["any"]
