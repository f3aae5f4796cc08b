"""Shared pieces of the pipeline tests: whole nodes (receiver, worker, dispatcher),
a recording Storage SCP standing in for a PACS, phantom series, database views.

The model is loaded once per test process (:func:`shared_model`) and handed to
every in-process :class:`~ichnode.service.Node`, so no test pays for loading
TensorFlow and the model twice.  Nothing waits with a fixed sleep: every wait
polls a condition with a deadline (:func:`tests.conftest.wait_for`).
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts, build_context
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from ichnode import db
from tests.conftest import config_data, wait_for, write_config

# Generous: the test machine has 2 cores shared with other jobs.
SCORE_TIMEOUT = 120.0

FINAL_STATES = (db.SCORED, db.SKIPPED, db.FAILED)

# pydicom warns on RSNA-style UIDs.
PIPELINE_WARNINGS = [pytest.mark.filterwarnings("ignore:Invalid value for VR UI")]


# -- the model -----------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def shared_model() -> Any:
    """The bundled default model, loaded once for the whole test process."""
    from ichnode.model import load_model

    return load_model(None)


# -- nodes ---------------------------------------------------------------------
ALL = ("receiver", "worker", "dispatcher")


class Nodes:
    """Starts in-process nodes under ``root`` with the shared model; :meth:`close` stops them."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.started: list[Any] = []

    def config(self, root: Path | None = None, **sections: dict[str, Any]) -> tuple[Path, Any]:
        """Write ``root/ichnode.yaml`` (the conftest test configuration plus ``sections``)
        and load it the way ``ichnode --config`` does; returns (path, Config)."""
        from ichnode.config import load_config

        root = Path(root or self.root)
        root.mkdir(parents=True, exist_ok=True)
        # A second of quiet completes a series: short, yet longer than the
        # pauses a loaded test machine makes in the middle of a transfer.
        sections["series"] = {"stable_seconds": 1.0, **sections.get("series", {})}
        path = write_config(root / "ichnode.yaml", config_data(root, **sections))
        return path, load_config(path)

    def start(
        self, config: Any = None, *, components: Sequence[str] = ALL, root: Path | None = None, **sections: Any
    ) -> Any:
        """A started Node: on ``config`` (a restart), else on a new configuration from ``sections``."""
        from ichnode.service import Node

        if config is None:
            _, config = self.config(root, **sections)
        node = Node(config, components=components, model=shared_model() if "worker" in components else None)
        self.started.append(node)
        node.start()
        return node

    def close(self) -> None:
        for node in self.started:
            node.stop(grace_seconds=2)


def node_factory(root: Path) -> Iterator[Nodes]:
    """Body of a test module's ``nodes`` fixture: ``yield from node_factory(tmp_path)``."""
    factory = Nodes(root)
    try:
        yield factory
    finally:
        factory.close()


# -- a PACS stand-in -------------------------------------------------------------
@dataclass
class Received:
    sop_instance_uid: str
    sop_class_uid: str
    status: int
    calling_ae: str
    dataset: Dataset


class Recorder:
    """A pynetdicom Storage SCP that records every C-STORE and answers ``status``.

    Set :attr:`status` at any time to make the next C-STOREs fail (0xA700),
    warn (0xB000) or succeed (0x0000).  ``sop_classes`` limits the storage
    SOP classes it accepts (default: all), ``transfer_syntaxes`` the transfer
    syntaxes (default: pynetdicom's).
    """

    def __init__(
        self,
        ae_title: str = "TEST_PACS",
        *,
        status: int = 0x0000,
        sop_classes: Sequence[str] | None = None,
        transfer_syntaxes: Sequence[str] | None = None,
    ):
        self.ae_title = ae_title
        self.status = status
        self.sop_classes = sop_classes
        self.transfer_syntaxes = transfer_syntaxes
        self.records: list[Received] = []
        self._lock = threading.Lock()
        self.server: Any = None

    def start(self, port: int = 0) -> Recorder:
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        sop_classes = self.sop_classes or [c.abstract_syntax for c in AllStoragePresentationContexts]
        ae.supported_contexts = [build_context(uid, self.transfer_syntaxes) for uid in sop_classes]
        self.server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return self

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        status = self.status
        with self._lock:
            self.records.append(
                Received(
                    str(ds.SOPInstanceUID),
                    str(ds.SOPClassUID),
                    status,
                    event.assoc.requestor.ae_title,
                    ds,
                )
            )
        return status

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def destination(self) -> dict[str, Any]:
        """This SCP as an entry of ``reports.destinations``."""
        return {"ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port}

    def stored(self) -> list[Received]:
        """The C-STOREs answered with Success."""
        with self._lock:
            return [r for r in self.records if r.status == 0x0000]

    def stored_counts(self) -> Counter[str]:
        """How many times each SOP Instance UID was stored with Success."""
        return Counter(r.sop_instance_uid for r in self.stored())

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


def recorder_factory() -> Iterator[Callable[..., Recorder]]:
    """Body of a ``recorder`` fixture: a factory ``recorder(ae_title, status=..., port=...,
    sop_classes=...)`` of started Recorders, all stopped at teardown."""
    started: list[Recorder] = []

    def make(ae_title: str = "TEST_PACS", *, port: int = 0, **kwargs: Any) -> Recorder:
        scp = Recorder(ae_title, **kwargs).start(port)
        started.append(scp)
        return scp

    try:
        yield make
    finally:
        for scp in started:
            scp.stop()


# -- series to send ----------------------------------------------------------------
def phantom(seed: int, *, matrix: int = 256, n_slices: int | None = 12, hemorrhage: Any = ("subdural",)) -> Any:
    """A phantom head CT series (``.datasets`` in z order, ``.labels``)."""
    from training.phantoms import make_series

    return make_series(seed, matrix=matrix, n_slices=n_slices, hemorrhage=list(hemorrhage), return_volume=False)


def write_series(datasets: Sequence[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, ds in enumerate(datasets):
        path = folder / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# -- database views ------------------------------------------------------------------
def measurement_sources(sr: Dataset) -> dict[str, list[str]]:
    """SOP Instance UIDs of each measurement group's "Source of Measurement"
    images in an SR, by the label its tracking identifier ("ICH subdural") names."""
    sources: dict[str, list[str]] = {}

    def concept(item: Dataset) -> str:
        return str(item.ConceptNameCodeSequence[0].CodeValue) if "ConceptNameCodeSequence" in item else ""

    def walk(items: Sequence[Dataset]) -> None:
        for item in items:
            if item.ValueType == "CONTAINER" and concept(item) == "125007":  # Measurement Group
                children = item.ContentSequence
                (label,) = [c.TextValue.removeprefix("ICH ") for c in children if concept(c) == "112039"]
                sources[label] = [
                    str(c.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                    for c in children
                    if c.ValueType == "IMAGE" and concept(c) == "121112"  # Source of Measurement
                ]
            else:
                walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return sources


def results_of(sessions: Any, series_uid: str) -> list[db.SeriesResult]:
    """Every result of a series, oldest first, with slices and deliveries loaded."""
    with sessions() as session:
        return list(
            session.scalars(
                select(db.SeriesResult)
                .join(db.Series)
                .where(db.Series.series_uid == series_uid)
                .options(selectinload(db.SeriesResult.slices), selectinload(db.SeriesResult.deliveries))
                .order_by(db.SeriesResult.id)
            )
        )


def wait_result(
    sessions: Any,
    series_uid: str,
    *,
    instances: int | None = None,
    version: int | None = None,
    timeout: float = SCORE_TIMEOUT,
) -> db.SeriesResult:
    """Poll until the series is scored, skipped or failed; the result of its current version.

    ``instances``: only once the series holds that many instances (a pause in
    a transfer longer than ``stable_seconds`` completes a series early; its
    next version then holds them all). ``version``: only that version.
    """

    def done() -> db.SeriesResult | None:
        with sessions() as session:
            series = session.scalars(select(db.Series).where(db.Series.series_uid == series_uid)).one_or_none()
            if series is None or series.state not in FINAL_STATES:
                return None
            if instances is not None and series.instance_count != instances:
                return None
            if version is not None and series.version != version:
                return None
            current = series.version
        found = [r for r in results_of(sessions, series_uid) if r.version == current]
        return found[-1] if found else None

    wanted = ", ".join(f"{k} {v}" for k, v in (("instances", instances), ("version", version)) if v is not None)
    return wait_for(
        done, timeout=timeout, interval=0.05, message=f"a result of series {series_uid} ({wanted or 'any'})"
    )


def deliveries(sessions: Any) -> list[db.Delivery]:
    with sessions() as session:
        return list(session.scalars(select(db.Delivery).order_by(db.Delivery.id)))


def wait_deliveries(
    sessions: Any, condition: Callable[[list[db.Delivery]], bool], *, timeout: float = SCORE_TIMEOUT, message: str
) -> list[db.Delivery]:
    """Poll the delivery rows until ``condition(rows)`` holds; the rows."""

    def check() -> list[db.Delivery] | None:
        rows = deliveries(sessions)
        return rows if rows and condition(rows) else None

    return wait_for(check, timeout=timeout, interval=0.05, message=message)


def instances_of(sessions: Any, series_uid: str) -> list[db.Instance]:
    with sessions() as session:
        return list(
            session.scalars(
                select(db.Instance).join(db.Series).where(db.Series.series_uid == series_uid).order_by(db.Instance.id)
            )
        )


def z_order(headers: Sequence[Dataset]) -> list[str]:
    """SOP Instance UIDs sorted along the slice normal (independent of ichnode.imaging)."""

    def position(ds: Dataset) -> float:
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        normal = np.cross(iop[:3], iop[3:])
        return float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient]))

    return [str(ds.SOPInstanceUID) for ds in sorted(headers, key=position)]


# -- SR content ----------------------------------------------------------------------
def _meaning(item: Dataset, keyword: str = "ConceptNameCodeSequence") -> str:
    seq = item.get(keyword)
    return str(seq[0].CodeMeaning) if seq else ""


def sr_findings(sr: Dataset) -> dict[str, dict[str, Any]]:
    """``{label: {"present": bool, "probability": float}}`` from the TID 1500
    measurement groups (tracking identifier ``ICH <label>``)."""
    findings: dict[str, dict[str, Any]] = {}

    def walk(items: Sequence[Dataset]) -> None:
        for item in items:
            children = item.get("ContentSequence", [])
            if item.get("ValueType") == "CONTAINER" and _meaning(item) == "Measurement Group":
                label = None
                entry: dict[str, Any] = {}
                for child in children:
                    kind, name = child.get("ValueType"), _meaning(child)
                    if kind == "TEXT" and name == "Tracking Identifier":
                        label = str(child.TextValue).removeprefix("ICH ")
                    elif kind == "NUM" and name == "Probability":
                        entry["probability"] = float(child.MeasuredValueSequence[0].NumericValue)
                    elif kind == "CODE" and _meaning(child, "ConceptCodeSequence") in ("Present", "Absent"):
                        entry["present"] = _meaning(child, "ConceptCodeSequence") == "Present"
                if label is not None:
                    findings[label] = entry
            walk(children)

    walk(sr.get("ContentSequence", []))
    return findings


def evidence_series(sr: Dataset) -> set[str]:
    """Series Instance UIDs in CurrentRequestedProcedureEvidenceSequence."""
    return {
        str(series.SeriesInstanceUID)
        for study in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
    }
