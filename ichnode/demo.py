"""``ichnode demo``: the whole product on one machine, in one command.

A node runs on its embedded defaults (on a free port, in a temporary folder,
with a 2-second completion wait) next to a small in-process "PACS" that
stores whatever it receives. Two phantom head CT studies are generated with
the bundled generator (one with hemorrhages, one without) and sent to the
node, plus the real GE series when ``../shared/data`` (or
``$ICHNODE_SHARED_DATA``) holds it; the
demo waits for the reports to reach the PACS and prints the findings.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts

from . import db
from .config import parse_config
from .results import format_results, list_results
from .scu import send_files
from .service import Node, explained_start_failures

# (seed, hemorrhages) of the demo phantoms: fixed so every run shows the same cases.
DEMO_PHANTOMS = ((1001, ["subdural", "intraparenchymal"]), (1002, []))
DEMO_STABLE_SECONDS = 2.0


def _shared_ge_series() -> Path | None:
    """The real GE series: in ``$ICHNODE_SHARED_DATA``, else in ``../shared/data``
    beside the working folder or the package."""
    folders = [Path(os.environ["ICHNODE_SHARED_DATA"])] if os.environ.get("ICHNODE_SHARED_DATA") else []
    folders += [base.parent / "shared" / "data" for base in (Path.cwd(), Path(__file__).resolve().parents[1])]
    for folder in folders:
        if (folder / "ge-head-ct").is_dir():
            return folder / "ge-head-ct"
    return None


def write_phantoms(out: Path) -> list[Path]:
    """Write the demo phantom series under ``out``; one folder per series."""
    from training.phantoms import make_series

    folders = []
    for seed, hemorrhage in DEMO_PHANTOMS:
        phantom = make_series(seed, matrix=512, hemorrhage=hemorrhage)
        folder = out / f"phantom-{seed}"
        folder.mkdir(parents=True)
        for index, ds in enumerate(phantom.datasets):
            ds.save_as(folder / f"{index:04d}.dcm", enforce_file_format=True)
        folders.append(folder)
    return folders


def run_demo(*, keep: bool = False, timeout: float = 300.0, echo: Callable[[str], None] = print) -> int:
    """Run the demo; returns a process exit code (0 when every report arrived)."""
    workdir = Path(tempfile.mkdtemp(prefix="ichnode-demo-"))
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(f"{event.dataset.Modality} {event.dataset.SOPInstanceUID}")
        return 0x0000

    pacs_server = node = None
    try:  # whatever stops the demo (a node that cannot start, Ctrl-C), it leaves nothing behind
        pacs = AE(ae_title="DEMO_PACS")
        pacs.supported_contexts = AllStoragePresentationContexts
        pacs_server = pacs.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        config = parse_config(
            {
                "node": {"port": 0},
                "series": {"stable_seconds": DEMO_STABLE_SECONDS, "check_interval_seconds": 0.5},
                "storage": {"min_free_mb": 100},
                "reports": {
                    "destinations": [
                        {"ae_title": "DEMO_PACS", "host": "127.0.0.1", "port": pacs_server.server_address[1]}
                    ]
                },
            },
            workdir,
        )
        echo(f"working folder {workdir}")
        echo("loading the model and starting the node ...")
        with explained_start_failures():
            node = Node(config)
        node.start()
        echo(f"node {config.node.ae_title} listening on 127.0.0.1:{node.port}")
        studies = write_phantoms(workdir / "studies")
        ge = _shared_ge_series()
        if ge is not None:
            studies.append(ge)
        for folder in studies:
            summary = send_files([folder], config.node.ae_title, "127.0.0.1", node.port)
            echo(f"sent {folder.name}: {', '.join(summary.lines()[:1])}")
        echo("waiting for the series to complete, be scored and reported ...")
        ok = _wait_for_reports(node, len(studies), timeout)
        with node.sessions() as session:
            echo(format_results(list_results(session), "table"))
        echo(f"the demo PACS received {len(received)} report objects")
        return 0 if ok else 1
    finally:
        if node is not None:
            node.stop(grace_seconds=2)
        if pacs_server is not None:
            pacs_server.shutdown()
        if keep:
            echo(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _wait_for_reports(node: Node, series_count: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with node.sessions() as session:
            rows = list_results(session)
        finished = [r for r in rows if r["status"] in (db.SCORED, db.SKIPPED, db.FAILED)]
        undelivered = [d for r in rows for d in r["delivery"] if d["state"] not in (db.SENT, db.DEAD)]
        if len(finished) >= series_count and not undelivered:
            return True
        time.sleep(0.5)
    return False
