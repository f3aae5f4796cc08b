#!/usr/bin/env python3
"""End-to-end latency: last slice's C-STORE response -> SR stored at the destination.

Run from the repository root::

    .venv/bin/python benchmarks/latency.py [--sizes 32,300] [--repeat 3]
        [--stable-seconds 2] [--tick 1] [--batch-size 32] [--target 2]

One process holds everything: an in-process :class:`ichnode.service.Node`
(receiver, series completion, worker, dispatcher; the bundled model from
``load_model(None)``, loaded for the node alone and warmed up by its worker
at start, as in service; fsync on), a
pynetdicom storage SCP standing in for the PACS (it records when each report
arrives), and a pynetdicom SCU that sends synthetic 512x512 head-CT series
made by :mod:`training.phantoms` (cached under the temp folder, so only the
first run pays for generating them).  Each repeat sends the series again with
fresh Study/Series/SOP Instance UIDs, so it is a new series to the node.

For each run the time from the last slice's C-STORE response (``t0``) to the
SR's arrival at the destination is split with the database timestamps and
light wrappers around the worker and dispatcher methods:

``completion wait``   t0 -> ``Series.completed_at`` (``series.stable_seconds``
                      plus up to one scheduler tick);
``worker tick wait``  completed_at -> ``Series.claimed_at`` (the worker job
                      runs once per tick);
``scoring``           claimed_at -> result committed, of which ``read+preprocess``
                      (claimed_at -> the model starts on it: header read,
                      selection, decode, HU, windows, resize, in one or, for
                      a long series, several helper processes), ``model``, ``reports`` (SR + summary image
                      built and spooled), ``db`` (results, slice rows and
                      deliveries in one transaction); ``SeriesResult.created_at``
                      is the start of that transaction;
``dispatch tick wait`` result committed -> the dispatcher picks the delivery up;
``delivery``          dispatcher start -> SR received by the destination
                      (reads the report file, associates, C-STORE);
                      ``Delivery.sent_at`` is after the response.

``processing`` is completion -> SR stored (what the node adds after the
series is complete, tick waits included); ``active`` leaves the two tick
waits out.  Baseline, measured in the same run on the same slices:
``model.predict_series`` on the already preprocessed series (median of 5),
the bare model.  Ratios against it show what decode, preprocessing, the
database and the reports add.  Prints median and min over the repeats and
whether ``processing`` of the smallest size meets ``--target`` seconds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pydicom import dcmread  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

DEST_AE = "BENCH_PACS"
SCU_AE = "BENCH_SCU"


# -- data --------------------------------------------------------------------
def phantom_series(n_slices: int, seed: int, matrix: int, cache: Path | None) -> list[Dataset]:
    """A phantom head-CT series of ``n_slices`` slices, from the cache when there."""
    folder = cache / f"seed{seed}-n{n_slices}-m{matrix}" if cache else None
    if folder is not None and (folder / "done").exists():
        return [dcmread(path) for path in sorted(folder.glob("*.dcm"))]
    import io
    from training.phantoms import make_series

    started = time.perf_counter()
    datasets = make_series(
        seed, matrix=matrix, n_slices=n_slices, hemorrhage=["subdural"], return_volume=False
    ).datasets
    log(f"generated a {n_slices}-slice {matrix}x{matrix} phantom in {time.perf_counter() - started:.0f} s")
    if len(datasets) != n_slices:
        raise RuntimeError(f"make_series gave {len(datasets)} slices, asked for {n_slices}")
    if folder is None:
        # Round-trip through bytes: datasets read from a file carry their
        # encoding, which pynetdicom checks against the transfer syntax.
        out = []
        for ds in datasets:
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            out.append(dcmread(io.BytesIO(buffer.getvalue())))
        return out
    folder.mkdir(parents=True, exist_ok=True)
    for index, ds in enumerate(datasets):
        ds.save_as(folder / f"{index:04d}.dcm", enforce_file_format=True)
    (folder / "done").touch()
    return [dcmread(path) for path in sorted(folder.glob("*.dcm"))]


def renew_uids(datasets: list[Dataset]) -> tuple[str, str]:
    """Give the series fresh study, series and instance UIDs (in place)."""
    study, series = generate_uid(), generate_uid()
    for ds in datasets:
        sop = generate_uid()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
    return study, series


# -- peers -------------------------------------------------------------------
class Destination:
    """A pynetdicom storage SCP that records when each object arrives."""

    def __init__(self) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

        self.arrivals: dict[str, tuple[float, str]] = {}  # SOP Instance UID -> (time, study UID)
        self._cond = threading.Condition()
        ae = AE(ae_title=DEST_AE)
        ae.maximum_pdu_size = 0
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        self.port = int(self.server.server_address[1])

    def _on_store(self, event: Any) -> int:
        arrived = time.time()
        study = str(event.dataset.StudyInstanceUID)
        with self._cond:
            self.arrivals[str(event.request.AffectedSOPInstanceUID)] = (arrived, study)
            self._cond.notify_all()
        return 0x0000

    def wait_study(self, study_uid: str, count: int, timeout: float) -> None:
        """Block until ``count`` objects of ``study_uid`` arrived."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while sum(1 for _, s in self.arrivals.values() if s == study_uid) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {count} report objects of study {study_uid} after {timeout:.0f} s")
                self._cond.wait(left)

    def stop(self) -> None:
        self.server.shutdown()


def send_series(port: int, datasets: list[Dataset]) -> tuple[float, float]:
    """C-STORE the series over one association; (first request, last response) times."""
    from pynetdicom import AE

    ae = AE(ae_title=SCU_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.maximum_pdu_size = 0
    for context in {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}:
        ae.add_requested_context(*context)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICHNODE")
    if not assoc.is_established:
        raise RuntimeError("association to the node was refused")
    try:
        first = time.time()
        for ds in datasets:
            response = assoc.send_c_store(ds)
            if response is None or int(response.get("Status", -1)) != 0:
                raise RuntimeError(f"C-STORE of {ds.SOPInstanceUID} answered {response}")
        last = time.time()  # the last slice's C-STORE response
    finally:
        assoc.release()
    return first, last


# -- instrumentation ---------------------------------------------------------
class Probe:
    """Seconds of the worker's steps per series (the helper processes report their
    own), when each result was committed, and when the dispatcher started on it."""

    def __init__(self) -> None:
        self.steps: dict[str, dict[str, float]] = defaultdict(dict)  # series UID -> step -> seconds
        self.committed: dict[str, float] = {}  # series UID -> end of the results transaction
        self.predict_start: dict[str, float] = {}  # series UID -> the model starts on it
        self.send_start: dict[int, float] = {}  # result id -> dispatcher start

    def attach(self, node: Any) -> None:
        # Instance attributes shadow the methods that Worker.run_once /
        # Dispatcher.run_once look up on self; the scheduled jobs stay as they are.
        worker, dispatcher = node.worker, node.dispatcher
        predict, finish, store, send_to = worker._predict, worker._finish, worker._store, dispatcher._send_to

        def predict_wrapper(items: Any) -> Any:
            start = time.time()
            result = predict(items)
            for item in items:
                self.predict_start[item.series_uid] = start
                self.steps[item.series_uid]["model"] = time.time() - start
            return result

        def finish_wrapper(item: Any, **kwargs: Any) -> None:
            start = time.time()
            finish(item, **kwargs)
            self.committed[item.series_uid] = end = time.time()
            self.steps[item.series_uid]["db"] = end - start

        def store_wrapper(item: Any, scored: Any) -> None:
            store(item, scored)
            if scored is not None and scored.reports is not None:
                self.steps[item.series_uid]["reports"] = scored.reports.result()[1]

        def send_wrapper(ae_title: str, host: str, port: int, deliveries: list[Any]) -> int:
            start = time.time()
            for delivery in deliveries:
                self.send_start.setdefault(delivery.result_id, start)
            return send_to(ae_title, host, port, deliveries)

        worker._predict, worker._finish, worker._store = predict_wrapper, finish_wrapper, store_wrapper
        dispatcher._send_to = send_wrapper


def epoch(value: dt.datetime) -> float:
    return value.replace(tzinfo=dt.UTC).timestamp()


def measure_run(node: Any, dest: Destination, probe: Probe, datasets: list[Dataset], timeout: float) -> dict[str, float]:
    from sqlalchemy import select

    from ichnode import db

    study, series_uid = renew_uids(datasets)
    first, t0 = send_series(node.port, datasets)
    expected = int(node.config.reports.sr) + int(node.config.reports.summary_image)
    dest.wait_study(study, expected, timeout)
    with node.sessions() as session:
        series = session.scalars(select(db.Series).where(db.Series.series_uid == series_uid)).one()
        result = session.scalars(
            select(db.SeriesResult).where(db.SeriesResult.series_id == series.id, db.SeriesResult.superseded.is_(False))
        ).one()
        deliveries = {d.kind: d for d in session.scalars(select(db.Delivery).where(db.Delivery.result_id == result.id))}
    if result.status != db.SCORED:
        raise RuntimeError(f"series {series_uid} was {result.status}: {result.skip_reason}")
    sr = deliveries["sr"]
    sr_arrival = dest.arrivals[sr.sop_instance_uid][0]
    completed, claimed = epoch(series.completed_at), epoch(series.claimed_at)
    committed = probe.committed[series_uid]
    send_start = probe.send_start[result.id]
    scoring = committed - claimed
    steps = {k: probe.steps[series_uid].get(k, 0.0) for k in ("model", "reports", "db")}
    # Wall time: a long series is decoded by several helper processes at once.
    steps["prepare"] = probe.predict_start[series_uid] - claimed
    row = {
        "send (first request -> last response)": t0 - first,
        "completion wait": completed - t0,
        "worker tick wait": claimed - completed,
        "scoring": scoring,
        "  read+preprocess (helpers, claim -> model)": steps["prepare"],
        "  model": steps["model"],
        "  reports (SR + summary, helper)": steps["reports"],
        "  db transaction": steps["db"],
        "  other (hand-offs, waits)": scoring - sum(steps.values()),
        "dispatch tick wait": send_start - committed,
        "delivery (to SR stored)": sr_arrival - send_start,
        "processing (completed -> SR stored)": sr_arrival - completed,
        "active (processing - tick waits)": (committed - claimed) + (sr_arrival - send_start),
        "end to end (last response -> SR stored)": sr_arrival - t0,
        # Cross-checks from the database alone.
        "db: completed -> result created_at": epoch(result.created_at) - completed,
        "db: created_at -> SR sent_at": epoch(sr.sent_at) - epoch(result.created_at),
    }
    if "summary" in deliveries:
        row["summary image stored after SR"] = dest.arrivals[deliveries["summary"].sop_instance_uid][0] - sr_arrival
    return row


def bare_model_seconds(model: Any, datasets: list[Dataset], batch_size: int, rounds: int = 5) -> tuple[float, float]:
    """(preprocess in memory, median bare ``predict_series``) seconds for one series."""
    from ichnode import imaging

    card = model.card
    started = time.perf_counter()
    x, _ = imaging.preprocess_series(datasets, card.windows, tuple(card.input_size), card.context_slices)
    preprocess = time.perf_counter() - started
    model.predict_series(x, batch_size)  # compile this shape
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        model.predict_series(x, batch_size)
        times.append(time.perf_counter() - started)
    return preprocess, statistics.median(times)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def exit_on_sigterm(signum: int, _frame: Any) -> None:
    # SystemExit unwinds through the finally blocks that stop and clean up.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32,300", help="slices per series, comma-separated (default 32,300)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per size (default 3)")
    parser.add_argument("--stable-seconds", type=float, default=2.0, help="series.stable_seconds (default 2)")
    parser.add_argument("--tick", type=float, default=1.0, help="series.check_interval_seconds (default 1, as shipped)")
    parser.add_argument("--batch-size", type=int, default=32, help="model.batch_size (default 32)")
    parser.add_argument("--matrix", type=int, default=512, help="rows and columns of the phantom (default 512)")
    parser.add_argument("--seed", type=int, default=7, help="phantom seed (default 7)")
    parser.add_argument("--target", type=float, default=2.0, help="processing target for the smallest size, s (default 2)")
    parser.add_argument("--no-cache", action="store_true", help="do not keep generated phantoms in the temp folder")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 10 or args.repeat < 1:
        parser.error("--sizes must list slice counts >= 10 (series.min_slices) and --repeat must be >= 1")

    signal.signal(signal.SIGTERM, exit_on_sigterm)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # "skipped: maximum number of running instances reached": a job that
    # outlasts a tick (the first, compiling run) -- expected, not news.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    import keras

    from ichnode.model import load_model
    from ichnode.worker import describe_device

    cache = None if args.no_cache else Path(tempfile.gettempdir()) / "ichnode-bench-phantoms"
    series = {n: phantom_series(n, args.seed + n, args.matrix, cache) for n in sorted(set(sizes))}

    model = load_model(None)
    log(f"model {model.card.name} {model.card.version} on {describe_device()}, keras {keras.__version__}")
    baseline = {n: bare_model_seconds(model, datasets, args.batch_size) for n, datasets in series.items()}

    workdir = Path(tempfile.mkdtemp(prefix="ichnode-latency-"))
    try:
        rows, first = run_all(args, series, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(args, rows, first, baseline, model)
    return 0


def run_all(
    args: argparse.Namespace, series: dict[int, list[Dataset]], workdir: Path
) -> tuple[dict[int, list[dict[str, float]]], dict[str, float]]:
    """Start the destination and the node, send one untimed series and then
    every size ``--repeat`` times, stop both; the timed runs, and the first."""
    from ichnode.config import parse_config
    from ichnode.model import load_model
    from ichnode.service import Node

    dest = Destination()
    config = parse_config(
        {
            "node": {"ae_title": "ICHNODE", "host": "127.0.0.1", "port": 0},
            "access": {"allow": [{"ae_title": "*", "host": "127.0.0.1"}]},
            "storage": {"spool_dir": str(workdir / "spool"), "min_free_mb": 0},
            "database": {"url": f"sqlite:///{workdir / 'ichnode.db'}"},
            "series": {"stable_seconds": args.stable_seconds, "check_interval_seconds": args.tick},
            "model": {"batch_size": args.batch_size},
            "reports": {"destinations": [{"ae_title": DEST_AE, "host": "127.0.0.1", "port": dest.port}]},
        },
        base=workdir,
    )
    rows: dict[int, list[dict[str, float]]] = {}
    try:
        # Its own model, untouched by the baseline: the node warms it up itself.
        node = Node(config, model=load_model(None))
    except BaseException:
        dest.stop()
        raise
    probe = Probe()
    probe.attach(node)
    try:
        node.start()
        timeout = 120 + 10 * args.stable_seconds
        # The first series after start, as after a restart in service; then
        # whatever else a first run pays (imports, files) is paid.
        log("first series through the node (reported apart)")
        first = measure_run(node, dest, probe, series[min(series)], timeout)
        for n, datasets in series.items():
            rows[n] = []
            for index in range(args.repeat):
                row = measure_run(node, dest, probe, datasets, timeout + n)
                rows[n].append(row)
                log(
                    f"{n} slices, run {index + 1}: processing {row['processing (completed -> SR stored)']:.2f} s, "
                    f"active {row['active (processing - tick waits)']:.2f} s, "
                    f"end to end {row['end to end (last response -> SR stored)']:.2f} s"
                )
    finally:
        node.stop(grace_seconds=5)
        dest.stop()
    return rows, first


def report(
    args: argparse.Namespace,
    rows: dict[int, list[dict[str, float]]],
    first: dict[str, float],
    baseline: dict[int, tuple[float, float]],
    model: Any,
) -> None:
    from ichnode.worker import describe_device

    print(
        f"\nichnode latency, {describe_device()}, {os.cpu_count()} CPUs, model {model.card.name} "
        f"{model.card.input_size[0]}x{model.card.input_size[1]}x{model.card.channels}, batch {args.batch_size}, "
        f"{args.matrix}x{args.matrix} phantoms, stable_seconds {args.stable_seconds:g}, tick {args.tick:g} s, "
        f"fsync on, {args.repeat} runs per size; seconds"
    )
    for n, runs in rows.items():
        preprocess, bare = baseline[n]
        print(f"\n{n} slices          {'median':>8s} {'min':>8s}")
        for key in runs[0]:
            values = [run[key] for run in runs]
            print(f"{key:42s} {statistics.median(values):8.3f} {min(values):8.3f}")
        print(f"{'baseline: bare model.predict_series':42s} {bare:8.3f}")
        print(f"{'(info: preprocess_series in memory)':42s} {preprocess:8.3f}")
        processing = statistics.median(run["processing (completed -> SR stored)"] for run in runs)
        active = statistics.median(run["active (processing - tick waits)"] for run in runs)
        print(f"ratio processing / bare model: {processing / bare:.1f}x; active / bare model: {active / bare:.1f}x")
    smallest = min(rows)
    print(f"\nfirst series after start ({smallest} slices, not in the figures above)")
    for key in ("processing (completed -> SR stored)", *(key for key in first if key.startswith("  "))):
        print(f"{key:42s} {first[key]:8.3f}")
    processing = statistics.median(run["processing (completed -> SR stored)"] for run in rows[smallest])
    active = statistics.median(run["active (processing - tick waits)"] for run in rows[smallest])
    verdict = "MET" if processing <= args.target else "NOT MET"
    print(
        f"\ntarget: processing of the {smallest}-slice series within {args.target:g} s: {verdict} "
        f"(median {processing:.2f} s with tick waits, {active:.2f} s active)"
    )


if __name__ == "__main__":
    sys.exit(main())
