#!/usr/bin/env python3
"""Scoring throughput: ``Worker.run_once`` over complete series vs the bare model.

Run from the repository root (any Keras backend; TensorFlow is not needed
with ``KERAS_BACKEND=torch`` or ``jax``)::

    .venv/bin/python benchmarks/scoring_throughput.py [--series 8] [--slices 32]
        [--batch-size 32] [--matrix 512] [--repeat 1] [--processes N]
        [--backbone EfficientNetB0] [--no-reports]

No network: it spools ``--series`` copies (fresh UIDs, same pixels) of one
synthetic 512x512 head-CT series from :mod:`training.phantoms` (numpy and
pydicom only; cached under the temp folder) into a fresh spool and SQLite
database with :func:`ichnode.series.register_instance`, marks them complete
with :func:`ichnode.series.complete_stable_series`, and times one
``Worker.run_once`` -- spooled files to stored results: header reads,
selection, decode, preprocessing (in the worker's helper processes,
overlapping inference), the model, SR + summary image built and spooled
(helper processes too) (fsync on, as
shipped), results in the database.  Each repeat spools a fresh set.  A warm-up
round (one claim's worth of series, same sizes) runs first, untimed, so every
shape is compiled.

Baseline, in the same run, on the same preprocessed slices and the same
batches the worker uses (``CLAIM_BATCH`` series per claim), the model fed two
ways: ``embed_slices`` on slices stacked on the host, and
``slice_stage_on_rows`` on unstacked slices with their neighbours' indices
(as the worker feeds it); then ``score_sequence`` per series.  Each is
measured before and after the end-to-end runs (the faster counts).  Prints
slices/s of all, the ratio to the faster feed (target: end-to-end >= 0.90 of
bare when decode and preprocessing overlap inference) and where the worker's
main thread spent its time.

``--backbone`` scores with an untrained model whose slice CNN is that
``keras.applications`` network (same input and card as the bundled model):
the bundled CNN is so small that decoding 512x512 files, not the model,
bounds the rate; a heavier CNN shows whether preprocessing hides behind
inference.  ``--processes`` sets ``model.worker_processes``.
``--no-reports`` turns the SR and summary image off, which leaves what
overlaps inference to decoding and preprocessing alone.
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
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _path in (REPO_ROOT, BENCH_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import numpy as np  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402

from latency import exit_on_sigterm, log, phantom_series, renew_uids  # noqa: E402  (numpy + pydicom only)


def spool_series(spool: Any, sessions: Any, datasets: list[Dataset], count: int) -> list[str]:
    """Write ``count`` copies of the series (fresh UIDs) into the spool and the database."""
    from ichnode.series import InstanceHeader, register_instance

    uids = []
    for _ in range(count):
        study, series = renew_uids(datasets)
        for ds in datasets:
            sop = str(ds.SOPInstanceUID)
            relative = spool.instance_path(study, series, sop)
            path = spool.absolute(relative)
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            header = InstanceHeader.from_dataset(ds, sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=sop)
            register_instance(
                sessions, header, path=relative, size_bytes=path.stat().st_size, calling_ae="BENCH_SCU", peer_host="127.0.0.1"
            )
        uids.append(series)
    return uids


def complete_all(sessions: Any) -> int:
    from ichnode import db
    from ichnode.series import complete_stable_series

    return len(complete_stable_series(sessions, 0.0, now=db.utcnow() + dt.timedelta(seconds=1)))


class Probe:
    """Seconds spent in the worker's steps: main thread, store thread, helper processes."""

    def __init__(self, worker: Any) -> None:
        self.totals: dict[str, float] = {}
        self._lock = threading.Lock()
        timed = (
            ("run_once", "run_once"),
            ("model", "_predict"),
            ("claim", "claim"),
            ("start", "_start_preparing"),
            ("db", "_finish"),
            ("store", "_store"),
        )
        for name, attr in timed:
            setattr(worker, attr, self._timed(name, getattr(worker, attr)))
        # A module function, looked up by the worker at each call.
        worker_module = sys.modules[type(worker).__module__]
        worker_module.gather_batch = self._timed("gather", worker_module.gather_batch)
        plan = worker_module.plan_batches

        def counted(lengths: Any, size: int) -> Any:
            batches = plan(lengths, size)
            self._add("batches", len(batches))
            return batches

        worker_module.plan_batches = counted

    def _add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.totals[name] = self.totals.get(name, 0.0) + seconds

    def _timed(self, name: str, func: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = func(*args, **kwargs)
            self._add(name, time.perf_counter() - start)
            if name == "store":  # (item, scored): what the helper processes spent on it
                item, scored = args
                self._add("prepare (process-s)", item.prepared.seconds)
                if scored is not None and scored.reports is not None:
                    self._add("reports (process-s)", scored.reports.result()[1])
            return result

        return wrapper

    def reset(self) -> None:
        self.totals = {}


def bare_rates(worker: Any, volume: np.ndarray, n_series: int, claim: int) -> dict[str, float]:
    """Slices/s of the model alone, batched as the worker batches ``n_series``
    copies of the preprocessed ``volume``, fed two ways (inputs built outside
    the timing): the 2.5D slices stacked on the host (``embed_slices``), and
    the slices with their neighbours' indices, stacked by the model as the
    worker feeds it (``slice_stage_on_rows``)."""
    from ichnode import imaging
    from ichnode.worker import batch_buffers, gather_batch, plan_batches

    model, size = worker.model, worker.config.model.batch_size
    card = model.card
    x = imaging.stack_context(volume, card.context_slices)
    groups = [min(claim, n_series - start) for start in range(0, n_series, claim)]
    stacked = {k: np.concatenate([x] * k) for k in set(groups)}
    gathered = {
        k: [
            gather_batch([volume] * k, runs, card.context_slices, *batch_buffers(card, size))
            for runs in plan_batches([len(volume)] * k, size)
        ]
        for k in set(groups)
    }
    n = len(x)

    def sequence_stage(embeddings: np.ndarray, k: int) -> None:
        if model.has_sequence_stage:
            for i in range(k):
                model.score_sequence(embeddings[i * n : (i + 1) * n])

    stage = model.embed_slices if model.has_sequence_stage else model.predict_slices
    start = time.perf_counter()
    for k in groups:
        sequence_stage(stage(stacked[k], size), k)
    on_host = time.perf_counter() - start
    start = time.perf_counter()
    for k in groups:
        sequence_stage(np.concatenate([model.slice_stage_on_rows(*batch, size) for batch in gathered[k]]), k)
    in_model = time.perf_counter() - start
    return {"stacked on the host": n * n_series / on_host, "stacked by the model": n * n_series / in_model}


def untrained_model(backbone: str, workdir: Path) -> Path:
    """An untrained two-stage model with ``backbone`` as its slice CNN and the default card's input."""
    from ichnode.model import ModelCard, card_path_for, default_model_path
    from training.models import (
        ArchitectureConfig,
        assemble,
        build_sequence_head,
        build_slice_encoder,
        build_slice_head,
    )

    card = ModelCard.from_json(card_path_for(default_model_path()))
    arch = ArchitectureConfig(backbone=backbone)
    encoder = build_slice_encoder((*card.input_size, card.channels), arch)
    path = workdir / f"untrained-{backbone}.keras"
    assemble(encoder, build_slice_head(), build_sequence_head(arch.embedding_dim, arch)).save(path)
    untrained = {"name": f"untrained-{backbone}", "version": "0", "architecture": {"config": arch.get_config()}}
    ModelCard.model_validate({**card.model_dump(mode="json"), **untrained}).to_json(card_path_for(path))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=8, help="complete series scored in one run_once (default 8)")
    parser.add_argument("--slices", type=int, default=32, help="slices per series (default 32)")
    parser.add_argument("--batch-size", type=int, default=32, help="model.batch_size (default 32)")
    parser.add_argument("--matrix", type=int, default=512, help="rows and columns of the phantom (default 512)")
    parser.add_argument("--repeat", type=int, default=1, help="timed run_once rounds, each on fresh series (default 1)")
    parser.add_argument("--seed", type=int, default=3, help="phantom seed (default 3)")
    parser.add_argument(
        "--processes", type=int, help="model.worker_processes: helper processes (default: CPU cores - 1, at least 2)"
    )
    parser.add_argument(
        "--backbone",
        help="score with an UNTRAINED model of the default card's input and this keras.applications slice CNN "
        "(e.g. EfficientNetB0) instead of the bundled model: shows the overlap when the model, not decoding, "
        "is the bottleneck",
    )
    parser.add_argument(
        "--no-reports", action="store_true", help="reports.sr and reports.summary_image off: decode and preprocess only"
    )
    parser.add_argument("--no-cache", action="store_true", help="do not keep the generated phantom in the temp folder")
    args = parser.parse_args(argv)
    if args.series < 1 or args.slices < 10 or args.batch_size < 1 or args.repeat < 1:
        parser.error("need --series >= 1, --slices >= 10 (series.min_slices), --batch-size >= 1, --repeat >= 1")

    signal.signal(signal.SIGTERM, exit_on_sigterm)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from ichnode.worker import describe_device

    device = describe_device()
    cache = None if args.no_cache else Path(tempfile.gettempdir()) / "ichnode-bench-phantoms"
    datasets = phantom_series(args.slices, args.seed, args.matrix, cache)

    workdir = Path(tempfile.mkdtemp(prefix="ichnode-throughput-"))
    try:
        return run(args, datasets, workdir, device)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace, datasets: list[Dataset], workdir: Path, device: str) -> int:
    """Set up a spool, a database and a worker in ``workdir``; measure; close them."""
    from ichnode import db
    from ichnode.config import parse_config
    from ichnode.model import load_model
    from ichnode.spool import Spool
    from ichnode.worker import Worker

    config = parse_config(
        {
            "storage": {"spool_dir": str(workdir / "spool"), "min_free_mb": 0},
            "database": {"url": f"sqlite:///{workdir / 'ichnode.db'}"},
            "model": {"batch_size": args.batch_size, "worker_processes": args.processes},
            # A destination nothing listens at (no dispatcher runs): reports are built and queued.
            "reports": {
                "sr": not args.no_reports,
                "summary_image": not args.no_reports,
                "destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": 9}],
            },
        },
        base=workdir,
    )
    engine = db.make_engine(config.database.url)
    db.init_db(engine)
    sessions = db.session_factory(engine)
    spool = Spool(config.storage.spool_dir, min_free_mb=0, fsync=config.storage.fsync)
    model = load_model(untrained_model(args.backbone, workdir) if args.backbone else config.model.path)
    worker = Worker(config, sessions, spool, model)
    try:
        return measure(args, datasets, model, worker, sessions, device)
    finally:
        worker.close()
        engine.dispose()


def measure(args: argparse.Namespace, datasets: list[Dataset], model: Any, worker: Any, sessions: Any, device: str) -> int:
    import keras

    from ichnode import db, imaging
    from ichnode.preparation import default_processes
    from ichnode.worker import CLAIM_BATCH

    spool, card = worker.spool, model.card
    log(f"keras {keras.__version__}, {device}; model {card.name} {card.version} input {card.input_shape}")

    volume, _ = imaging.preprocess_series(datasets, card.windows, tuple(card.input_size), 0)
    warm = min(CLAIM_BATCH, args.series)
    spool_series(spool, sessions, datasets, warm)
    complete_all(sessions)
    started = time.perf_counter()
    worker.run_once()
    log(f"warm-up: {warm} series in {time.perf_counter() - started:.1f} s (not timed)")
    bare = [bare_rates(worker, volume, args.series, CLAIM_BATCH)]

    probe = Probe(worker)
    total = args.series * args.slices
    rates, breakdowns = [], []
    for round_ in range(args.repeat):
        uids = spool_series(spool, sessions, datasets, args.series)
        complete_all(sessions)
        probe.reset()
        started = time.perf_counter()
        handled = worker.run_once()
        elapsed = time.perf_counter() - started
        with sessions() as session:
            from sqlalchemy import func, select

            scored = session.scalar(
                select(func.count())
                .select_from(db.SeriesResult)
                .join(db.Series)
                .where(db.Series.series_uid.in_(uids), db.SeriesResult.status == db.SCORED)
            )
        if handled != args.series or scored != args.series:
            raise RuntimeError(f"run_once handled {handled} series and scored {scored}, expected {args.series}")
        rates.append(total / elapsed)
        breakdowns.append((elapsed, dict(probe.totals)))
        log(f"round {round_ + 1}: {total} slices in {elapsed:.2f} s, {total / elapsed:.0f} slices/s")
    bare.append(bare_rates(worker, volume, args.series, CLAIM_BATCH))

    end_to_end = statistics.median(rates)
    # Each feed's better run; the ratio is taken against the faster feed.
    feeds = {feed: max(run[feed] for run in bare) for feed in bare[0]}
    baseline = max(feeds, key=feeds.__getitem__)
    best_bare = feeds[baseline]
    elapsed, t = min(breakdowns, key=lambda b: b[0])
    main, model_s = t.get("run_once", elapsed), t.get("model", 0.0)
    processes = args.processes or default_processes()
    print(
        f"\nichnode scoring throughput, keras {keras.__version__}, {device}, {os.cpu_count()} CPUs\n"
        f"model {card.name} {card.version}, input {card.input_shape}, batch {args.batch_size}, "
        f"{args.series} series x {args.slices} slices ({args.matrix}x{args.matrix}) = {total} slices per round, "
        f"{processes} helper processes, up to {max(CLAIM_BATCH, processes)} series in preparation, "
        f"reports {'off' if args.no_reports else 'SR + summary'}, fsync on, "
        f"{args.repeat} round(s)\n"
    )
    print(f"{'end to end (Worker.run_once, files -> results)':50s} {end_to_end:8.1f} slices/s  (median)")
    for feed, rate in feeds.items():
        runs = ", ".join(f"{run[feed]:.0f}" for run in bare)
        print(f"{'bare model, same batches, ' + feed:50s} {rate:8.1f} slices/s  (best of {runs})")
    ratio = end_to_end / best_bare
    print(
        f"{'ratio end to end / bare (' + baseline + ')':50s} {ratio:8.2f}   "
        f"target >= 0.90: {'MET' if ratio >= 0.9 else 'NOT MET'}"
    )
    print(f"\nfastest round, {elapsed:.2f} s wall; worker main thread, store thread (overlapping):")
    parts = {
        "model (_predict, main thread)": model_s,
        "  next batches' slices gathered (gathering thread)": t.get("gather", 0.0),
        "waiting for prepared series, claiming (main thread)": main - model_s,
        "  of which claiming, handing to helpers": t.get("claim", 0.0) + t.get("start", 0.0),
        "waiting for reports + db (store thread)": t.get("store", 0.0),
        "  of which db (results transaction)": t.get("db", 0.0),
    }
    for name, seconds in parts.items():
        print(f"  {name:52s} {seconds:7.2f} s  {100 * seconds / elapsed:5.1f} %")
    # A batch costs the model as much however few slices it holds.
    print(f"  model batches {t.get('batches', 0):.0f} (fewest for {total} slices: {-(-total // args.batch_size)})")
    prepare_s, reports_s = t.get("prepare (process-s)", 0.0), t.get("reports (process-s)", 0.0)
    print(
        f"helper processes (overlapping the above): read+preprocess {prepare_s:.2f} process-s "
        f"({total / max(prepare_s, 1e-9):.0f} slices/s per process), reports {reports_s:.2f} process-s "
        f"({reports_s / args.series:.3f} s per series)"
    )
    # All helpers busy at these costs: what end to end cannot pass, whatever the model.
    ceiling = processes * total / max(prepare_s + reports_s, 1e-9)
    print(f"helper ceiling: {ceiling:.0f} slices/s with {processes} processes, {ceiling / best_bare:.2f} x bare")
    backend = keras.backend.backend()
    if backend != "tensorflow" and "tensorflow" in sys.modules:
        print(f"warning: tensorflow was imported although the backend is {backend}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
