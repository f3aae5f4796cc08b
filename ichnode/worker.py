"""The inference worker: claims complete series, scores them, queues the reports.

For each claimed series the worker reads the headers, decides eligibility
(:mod:`ichnode.selection`), builds the volume with the shared
:mod:`ichnode.imaging`, runs the model, and in one transaction stores the
slice and series results and the deliveries of the report objects it wrote
to the spool. A slice that cannot be read or decoded is quarantined with the
reason; the series is scored from the rest and its result says so.

Reading and preprocessing overlap inference, and so does building the
reports; both run in helper processes (:mod:`ichnode.preparation`) so they
use every core, and a long series is decoded in parts by helpers that would
otherwise idle. The series prepared at the same moment share prediction
batches, which keeps a GPU busy, and results are recorded on their own thread.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import insert, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from . import db, imaging
from .config import LABELS, Config, Peer
from .model import HemorrhageModel, ModelCard, flags, series_scores
from .preparation import (
    InstanceRow,
    PreparedVolume,
    ShortOfResources,
    decode_slices,
    default_processes,
    new_volume_file,
    order_series,
    prepare_series,
    process_pool,
    ready,
    write_reports,
)
from .receiver import host_addresses
from .reports import Finding, ReportContent, report_uids
from .selection import replaced_by_a_later_copy
from .spool import Spool

logger = logging.getLogger(__name__)

# Series claimed per round: those prepared at the same time share prediction batches.
CLAIM_BATCH = 4
# Fewest slices worth a helper process of their own when a series is decoded in parts.
SLICES_PER_PART = 32
# Batches the gathering thread may have ready or in hand while the model runs one.
GATHERED_AHEAD = 2
# Series runs one batch may hold: each brings up to 2k neighbour rows beyond
# its slices, and the rows buffer is sized for that many.
RUNS_PER_BATCH = 8
# Where partial batches cost a full one, how long a prepared series may wait
# for others to fill its batch: a backlog (of series to skip, say) must not
# hold a head CT's result back.
LONGEST_WAIT_FOR_A_BATCH_SECONDS = 1.0
# A helper that takes longer than this to prepare a series (or its part) has
# stopped answering: a decoder looping on a crafted frame, a spool on a hung
# network mount. Its helpers are replaced, and the series is scored again alone.
PREPARATION_SECONDS = 60.0
PREPARATION_SECONDS_PER_SLICE = 1.0
# How often work still queued for the helpers is looked at: its time starts
# when a helper takes it up.
TAKEN_UP_CHECK_SECONDS = 1.0
# Said of an outcome recorded as superseded at once: images came while it
# was scored (the next version follows), or an earlier result stands.
_NOT_CURRENT = "; superseded at once, not reported"


@dataclass
class ClaimedSeries:
    """A series this worker claimed; ``prepared`` once it is read and preprocessed."""

    series_id: int
    series_uid: str
    study_uid: str
    version: int
    calling_ae: str | None
    peer_host: str | None  # where the series came from: the sender to return reports to
    prepared: PreparedVolume = field(default_factory=PreparedVolume)
    parts: int = 1  # helper processes decoding it
    slice_count: int = 0  # images handed to the helpers
    failed: bool = False
    stuck: bool = False  # a helper preparing it stopped answering
    volume_file: str | None = None  # where helpers leave its volume (chosen here, removed on failure)
    # Slices quarantined by earlier versions (and missing from the volume): not read again, still not scored.
    quarantined_before: int = 0
    # Earlier versions whose SR the PACS holds (the newest sent) or may get
    # while this one is scored (on its way): the new SR names them as predecessors.
    previous_sr_versions: tuple[int, ...] = ()

    @property
    def key(self) -> tuple[int, int]:
        return self.series_id, self.version

    @property
    def sop_uids(self) -> list[str]:
        return self.prepared.sop_uids

    @property
    def quarantined(self) -> dict[int, str]:
        return self.prepared.quarantined

    @property
    def quarantined_count(self) -> int:
        """Images left out for what they lack, this version's and earlier
        ones': an older copy of a slice sent again is not missing."""
        missing = [reason for reason in self.quarantined.values() if not replaced_by_a_later_copy(reason)]
        return len(missing) + self.quarantined_before


@dataclass(frozen=True)
class Scored:
    """What the model found in a series, and the report objects being written for it."""

    probs: np.ndarray  # (N, 6) per slice, z order
    scores: dict[str, float]
    flags: dict[str, bool]
    key: int  # index of the key slice
    reports: Future[tuple[list[tuple[str, str, str]], float]] | None
    targets: list[tuple[str, str, int]]  # (AE title, host, port) the reports go to


class Worker:
    """Scores complete series with one loaded model; run :meth:`run_once` on a schedule."""

    def __init__(self, config: Config, sessions: sessionmaker[Session], spool: Spool, model: HemorrhageModel) -> None:
        self.config = config
        self.sessions = sessions
        self.spool = spool
        self.model = model
        card = model.card
        # Config thresholds override the card's, label by label.
        self.thresholds = {**card.thresholds, **config.model.thresholds}
        self._installation = db.installation(sessions)
        # Helper processes leave volumes here; what a crash left behind is removed.
        self._handoff = spool.tmp_dir / "worker"
        self._handoff.mkdir(exist_ok=True)
        spool.clear_tmp(self._handoff)
        self._process_count = config.model.worker_processes or default_processes()
        self._processes = process_pool(self._process_count)
        # Enough series in preparation at once to keep every helper process busy.
        self._in_flight = max(CLAIM_BATCH, self._process_count)
        self._store_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ichnode-store")
        self._gatherer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ichnode-gather")
        # Series to put back to complete at the next round's start: the database
        # refused to record their outcome (store thread), a helper died, or the model failed.
        self._put_back: list[ClaimedSeries] = []
        # Series a failure maybe not their own took down once (a helper died,
        # the model failed on a batch they shared): scored again alone, the
        # second time they fail (a file that crashes the decoder must not
        # crash the helpers forever).
        self._retried_once: set[tuple[int, int]] = set()
        self._stopping = threading.Event()
        self._warm_up()

    def _warm_up(self) -> None:
        # The first predictions trace the model (~1 s) and each helper process
        # imports pydicom and highdicom (~1 s): pay both at start, not on the
        # first patient's series. On a CPU TensorFlow traces again for a
        # second input shape, then for any shape: so two batches that differ
        # in slices and in rows read, and two series lengths. (JAX compiles
        # the one batch shape here, and each bucket of series lengths as it
        # first comes.)
        started = [self._processes.submit(ready) for _ in range(self._process_count)]
        size = self.config.model.batch_size
        rows, neighbours = batch_buffers(self.model.card, size)
        neighbours[:] = np.arange(size)[:, None] + np.arange(neighbours.shape[1])  # slice i and the next 2k
        half, last = neighbours[: max(1, size // 2)], len(rows) - 1
        # The second reads another number of rows: up to the last, unless the first does.
        second = half if neighbours.max() == last else half + (last - half.max())
        for batch in (neighbours, second):
            self.model.slice_stage_on_rows(rows, batch, size)
        if self.model.has_sequence_stage:
            for length in (2, 3):
                self.model.score_sequence(np.zeros((length, self.model.embedding_dim), dtype=np.float32))
        wait(started)

    def stop(self) -> None:
        """Finish the series in hand and claim no more: the node is stopping
        (what is complete and not claimed waits for the next start)."""
        self._stopping.set()

    def close(self) -> None:
        self._store_pool.shutdown(wait=True)
        self._gatherer.shutdown(wait=True)
        self._processes.shutdown(wait=True)

    # -- claiming --------------------------------------------------------
    def claim(self, limit: int = CLAIM_BATCH) -> list[ClaimedSeries]:
        """Move up to ``limit`` complete series to processing; safe with several workers."""
        claimed = []
        with db.transaction(self.sessions) as session:
            candidates = session.execute(
                select(db.Series.id, db.Series.version)
                .where(db.Series.state == db.COMPLETE)
                .order_by(db.Series.completed_at)
                .limit(limit)
            ).all()
            for series_id, version in candidates:
                won = session.execute(
                    update(db.Series)
                    .where(db.Series.id == series_id, db.Series.state == db.COMPLETE)
                    .values(state=db.PROCESSING, claimed_at=db.utcnow())
                ).rowcount
                if won:
                    series = session.get(db.Series, series_id)
                    claimed.append(
                        ClaimedSeries(
                            series_id,
                            series.series_uid,
                            series.study_uid,
                            version,
                            series.calling_ae,
                            series.peer_host,
                        )
                    )
        return claimed

    def _claim_more(self, limit: int) -> list[ClaimedSeries]:
        """:meth:`claim` while series are in hand: a failure (a database busy
        past its timeout) must not abandon those, so it claims none this time."""
        try:
            return self.claim(limit)
        except Exception:
            logger.exception("claiming more series failed; the next round claims them")
            return []

    def run_once(self) -> int:
        """Claim and process what is complete; returns the number of series handled.

        Series are read and preprocessed by the helper processes while the
        model scores those already prepared; the series ready by then share
        prediction batches (which keeps a GPU busy); reports are built by the
        helper processes and results recorded by another thread while the
        model moves on.
        """
        if self._stopping.is_set():
            return 0
        self._put_back_series()
        # Series scored again (see ``_retried_once``) come after the others,
        # each alone: if one fails again, it fails, and nothing with it.
        suspects: list[ClaimedSeries] = []

        def set_aside(claimed: list[ClaimedSeries]) -> list[ClaimedSeries]:
            suspects.extend(item for item in claimed if item.key in self._retried_once)
            return [item for item in claimed if item.key not in self._retried_once]

        def claim_more(limit: int) -> list[ClaimedSeries]:
            if suspects or self._stopping.is_set():  # suspects wait for no newcomer
                return []
            return set_aside(self._claim_more(limit))

        try:
            handled = self._process(set_aside(self.claim(self._in_flight)), claim_more)
            while suspects and not self._stopping.is_set():
                handled += self._process([suspects[0]], None)
                self._retried_once.discard(suspects.pop(0).key)
        finally:
            self._put_back.extend(suspects)  # not scored this round (a stop, an error): scored later
        return handled

    def _process(
        self, claimed: list[ClaimedSeries], claim_more: Callable[[int], list[ClaimedSeries]] | None
    ) -> int:
        """Prepare, score and store ``claimed``, and what ``claim_more`` gives
        while the model works (None: nothing more); returns the series handled."""
        handled = 0
        # Helper-process work under way, and the series and step it is for.
        preparing: dict[Future[Any], tuple[ClaimedSeries, str]] = {}
        deadlines: dict[Future[Any], float] = {}  # of work a helper took up: past it, it has stopped answering
        stores: list[Future[None]] = []

        def in_preparation() -> list[ClaimedSeries]:
            return list({id(item): item for item, _ in preparing.values()}.values())

        def fail(item: ClaimedSeries, exc: Exception) -> None:
            nonlocal handled
            item.failed = True
            if item.volume_file is not None:
                Path(item.volume_file).unlink(missing_ok=True)
            handled += 1
            why = "a helper process stopped answering" if item.stuck else "a helper process died"
            if isinstance(exc, BrokenProcessPool) and self._scored_again_alone(item, why):
                return
            if isinstance(exc, ShortOfResources) and self._scored_again_alone(item, f"a helper ran short ({exc})"):
                return
            logger.exception("preparing series %s failed", item.series_uid)
            reason = f"preparing failed: {why} (BrokenProcessPool)" if item.stuck else f"preparing failed: {exc!r}"
            stores.append(self._store_pool.submit(self._fail_or_keep, item, reason))

        def prepare(claimed: list[ClaimedSeries]) -> None:
            for item in claimed:
                # Helpers already promised to series in preparation, one per part.
                busy = sum(other.parts for other in in_preparation())
                try:
                    started = self._start_preparing(item, busy)
                except Exception as exc:
                    fail(item, exc)
                    continue
                for future, step in started:
                    preparing[future] = (item, step)

        prepare(claimed)
        held: list[ClaimedSeries] = []  # prepared, waiting for others to fill a batch
        held_since = 0.0
        while preparing:
            now = time.monotonic()
            for future, (item, _) in preparing.items():
                if future not in deadlines and future.running():
                    deadlines[future] = now + PREPARATION_SECONDS + PREPARATION_SECONDS_PER_SLICE * item.slice_count
            # The work of helpers already ended (stuck) fails by itself, soon.
            ends = [deadlines[f] for f, (item, _) in preparing.items() if f in deadlines and not item.stuck]
            if len(deadlines) < len(preparing):  # some not yet taken up
                ends.append(now + TAKEN_UP_CHECK_SECONDS)
            if held:
                ends.append(held_since + LONGEST_WAIT_FOR_A_BATCH_SECONDS)
            timeout = max(0.0, min(ends) - now) if ends else None
            done, _ = wait(preparing, timeout=timeout, return_when=FIRST_COMPLETED)
            now = time.monotonic()
            overdue = {
                id(item): item
                for f, (item, _) in preparing.items()
                if not f.done() and not item.stuck and deadlines.get(f, now + 1) <= now
            }
            if overdue:
                self._replace_stuck_helpers(list(overdue.values()))  # their work then ends as at a helper's death
            items = []
            for future in done:
                item, step = preparing.pop(future)
                deadlines.pop(future, None)
                if item.failed:
                    continue  # another part of it failed already
                try:
                    for more, next_step in self._prepared(item, step, future.result()):
                        preparing[more] = (item, next_step)
                    if any(other is item for other, _ in preparing.values()):
                        continue  # parts of it still being decoded
                    item.prepared.receive_volume(self.config.series.min_slices)
                except Exception as exc:
                    fail(item, exc)
                else:
                    items.append(item)
                    handled += 1
            # Claim more while the model works, so the processes never idle.
            in_hand = len(in_preparation())
            if claim_more is not None and in_hand < self._in_flight:
                prepare(claim_more(self._in_flight - in_hand))
            # Where a partial batch costs the model as much as a full one,
            # series wait until they fill one, unless no more are coming or
            # they waited long enough; elsewhere none waits. Skipped series
            # need no batch.
            unscorable = [item for item in items if item.prepared.volume is None]
            ready = [item for item in items if item.prepared.volume is not None]
            if ready and not held:
                held_since = time.monotonic()
            held += ready
            slices = sum(len(item.prepared.volume) for item in held)
            waited = time.monotonic() - held_since >= LONGEST_WAIT_FOR_A_BATCH_SECONDS
            if self.model.pads_batches and preparing and slices < self.config.model.batch_size and not waited:
                stores.extend(self._score_all(unscorable))
            else:
                stores.extend(self._score_all(unscorable + held))
                held = []
        for future in stores:
            future.result()
        return handled

    def _score_all(self, items: list[ClaimedSeries]) -> list[Future[None]]:
        """Score the prepared ``items`` together and hand their results (or
        skips) to the store thread. When the model fails, each series is
        scored again alone and fails only if it fails then too; a series whose
        scores cannot be made fails alone."""
        scorable = [item for item in items if item.prepared.volume is not None]
        try:
            probabilities = dict(zip(map(id, scorable), self._predict(scorable)))
        except Exception as exc:
            logger.exception("scoring %d series failed", len(scorable))
            reason = f"scoring failed: {type(exc).__name__}: {exc}"
            return [
                self._store_pool.submit(self._again_alone_or_fail, item, reason)
                if item.prepared.volume is not None
                else self._store_pool.submit(self._store_or_fail, item, None)
                for item in items
            ]
        stores = []
        for item in items:
            scored = None
            if item.prepared.volume is not None:
                try:
                    scored = self._score(item, probabilities[id(item)])
                except Exception as exc:
                    logger.exception("scoring series %s failed", item.series_uid)
                    reason = f"scoring failed: {type(exc).__name__}: {exc}"
                    stores.append(self._store_pool.submit(self._fail_or_keep, item, reason))
                    continue
            stores.append(self._store_pool.submit(self._store_or_fail, item, scored))
        return stores

    def _submit(self, fn: Any, *args: Any, **kwargs: Any) -> Future[Any]:
        """Hand work to the helper processes, replacing them if one died."""
        try:
            return self._processes.submit(fn, *args, **kwargs)
        except BrokenProcessPool:
            logger.error("a helper process died; starting new helper processes (its series are scored again alone)")
            self._processes.shutdown(wait=False)
            self._processes = process_pool(self._process_count)
            return self._processes.submit(fn, *args, **kwargs)

    def _replace_stuck_helpers(self, stuck: list[ClaimedSeries]) -> None:
        """End the helper processes, one of which stopped answering: every
        series they held fails as at a helper's death (each is scored again
        alone once), and the next work starts new ones."""
        for item in stuck:
            item.stuck = True
            logger.error("a helper process preparing series %s stopped answering; replacing the helpers", item.series_uid)
        # The executor knows its processes only by this attribute.
        for process in list(getattr(self._processes, "_processes", {}).values()):
            process.kill()

    # -- preparing -------------------------------------------------------
    def _start_preparing(self, item: ClaimedSeries, busy: int) -> list[tuple[Future[Any], str]]:
        """Hand a claimed series to the helper processes. A series with many
        slices, when helpers would otherwise idle (``busy`` of them are
        promised to other series), is decoded in parts by several of them:
        its latency then shrinks with the helpers, not only the throughput."""
        with self.sessions() as session:
            rows = [
                InstanceRow(*row)
                for row in session.execute(
                    select(db.Instance.id, db.Instance.path, db.Instance.sop_class_uid, db.Instance.sop_instance_uid)
                    .where(db.Instance.series_id == item.series_id, db.Instance.quarantine_reason.is_(None))
                    .order_by(db.Instance.id)
                )
            ]
            item.quarantined_before = sum(
                not replaced_by_a_later_copy(reason)
                for reason in session.scalars(
                    select(db.Instance.quarantine_reason).where(
                        db.Instance.series_id == item.series_id, db.Instance.quarantine_reason.is_not(None)
                    )
                )
            )
            sr_states = session.execute(
                select(db.SeriesResult.version, db.Delivery.state)
                .join(db.Delivery)
                .where(
                    db.SeriesResult.series_id == item.series_id,
                    db.SeriesResult.version < item.version,
                    db.Delivery.kind == "sr",
                    db.Delivery.state.in_((db.QUEUED, db.SENDING, db.SENT)),
                )
            ).all()
        item.previous_sr_versions = _predecessors(sr_states)
        item.slice_count = len(rows)
        item.parts = max(1, min(self._process_count - busy, -(-len(rows) // SLICES_PER_PART)))
        item.volume_file = str(self._handoff / f"volume-{uuid.uuid4().hex}.npy")
        root, rules = self.spool.root, self.config.series
        if item.parts > 1:
            return [(self._submit(order_series, root, rows, rules), "ordered")]
        card = self.model.card
        arguments = (root, rows, rules, card.windows, tuple(card.input_size), item.volume_file)
        return [(self._submit(prepare_series, *arguments), "prepared")]

    def _prepared(self, item: ClaimedSeries, step: str, result: Any) -> list[tuple[Future[Any], str]]:
        """Take in what a helper finished for ``item``; returns the work that follows."""
        if step == "decoded":
            quarantined, seconds = result
            item.prepared.quarantined.update(quarantined)
            item.prepared.seconds += seconds
            return []
        item.prepared = result
        if step == "prepared" or not result.rows:
            return []
        # Ordered: the parts decode into one volume file, each its own rows.
        card = self.model.card
        windows, size = card.windows, tuple(card.input_size)
        rows = result.rows
        new_volume_file(item.volume_file, len(rows), windows, size)
        result.volume_file = item.volume_file
        bounds = np.linspace(0, len(rows), item.parts + 1).astype(int)
        parts: list[tuple[Future[Any], str]] = []
        try:
            for a, b in zip(bounds[:-1], bounds[1:]):
                part = self._submit(decode_slices, self.spool.root, rows[a:b], windows, size, item.volume_file, a)
                parts.append((part, "decoded"))
        except Exception:
            for future, _ in parts:  # the series fails: what has not started need not run
                future.cancel()
            raise
        return parts

    # -- scoring ---------------------------------------------------------
    def _predict(self, items: Sequence[ClaimedSeries]) -> list[np.ndarray]:
        """Per-slice probabilities (N_i, 6) of each series, in its z order.

        The gathering thread copies the next batches' slices (numpy copies,
        outside the interpreter lock) while the model runs on this one, so a
        GPU is not left waiting for its inputs; the model stacks each slice
        with its neighbours itself.  Three buffers rotate: one in the model,
        one ready, one being filled.
        """
        if not items:
            return []
        card = self.model.card
        size = self.config.model.batch_size
        volumes = [item.prepared.volume for item in items]
        plan = plan_batches([len(volume) for volume in volumes], size)
        buffers = [batch_buffers(card, size) for _ in range(min(GATHERED_AHEAD + 1, len(plan)))]

        def gathered(number: int) -> Future[tuple[np.ndarray, np.ndarray]]:
            rows, neighbours = buffers[number % len(buffers)]
            return self._gatherer.submit(gather_batch, volumes, plan[number], card.context_slices, rows, neighbours)

        ahead = {number: gathered(number) for number in range(min(GATHERED_AHEAD, len(plan)))}
        outputs: list[list[np.ndarray]] = [[] for _ in items]
        for number, runs in enumerate(plan):
            rows, neighbours = ahead.pop(number).result()
            if number + GATHERED_AHEAD < len(plan):
                ahead[number + GATHERED_AHEAD] = gathered(number + GATHERED_AHEAD)
            # Slice stage: embeddings for a two-stage model, probabilities otherwise.
            result = self.model.slice_stage_on_rows(rows, neighbours, size)
            offset = 0
            for index, _, count in runs:
                outputs[index].append(result[offset : offset + count])
                offset += count
        per_series = [np.concatenate(parts) for parts in outputs]
        if self.model.has_sequence_stage:
            # The sequence stage needs one whole series in z order.
            return [self.model.score_sequence(embeddings) for embeddings in per_series]
        return per_series

    def _score(self, item: ClaimedSeries, probs: np.ndarray) -> Scored:
        """Series scores and flags, and the report objects handed to the helper processes."""
        card = self.model.card
        scores = series_scores(probs, card)
        found = flags(scores, self.thresholds)
        # Where each label scored highest: the key slice is that of "any".
        tops = [item.sop_uids[int(i)] for i in np.argmax(probs, axis=0)]
        key = int(np.argmax(probs[:, LABELS.index("any")]))
        content = ReportContent(
            findings=tuple(
                Finding(label, scores[label], found[label], self.thresholds[label], tops[i])
                for i, label in enumerate(LABELS)
            ),
            key_sop_instance_uid=item.sop_uids[key],
            algorithm_name=card.name,
            algorithm_version=card.version,
            version=item.version,
            quarantined_count=item.quarantined_count,
            disclaimer=card.disclaimer,
        )
        wanted = self.config.reports
        reports = None
        # Reports with nowhere to go are not built: nothing would ever remove them.
        targets = self.destinations(item.calling_ae, item.peer_host)
        if targets and (wanted.sr or wanted.summary_image):
            reports = self._submit(
                write_reports,
                self.spool,
                item.study_uid,
                item.prepared.paths[key],
                list(zip(item.prepared.sop_class_uids, item.sop_uids)),
                content,
                report_uids(
                    item.series_uid,
                    item.version,
                    previous_versions=item.previous_sr_versions,
                    installation=self._installation,
                ),
                sr=wanted.sr,
                summary_image=wanted.summary_image,
            )
        return Scored(probs, scores, found, key, reports, targets)

    def _store_or_fail(self, item: ClaimedSeries, scored: Scored | None) -> None:
        try:
            self._store(item, scored)
        except Exception as exc:
            if isinstance(exc, BrokenProcessPool) and self._scored_again_alone(item, "a helper process died"):
                return  # its reports were being built
            if isinstance(exc, OperationalError):  # locked past its timeout, a connection gone: not the series'
                logger.exception("the database did not record series %s; it is scored again", item.series_uid)
                self._put_back.append(item)
                return
            logger.exception("storing the result of series %s failed", item.series_uid)
            self._fail_or_keep(item, f"{type(exc).__name__}: {exc}")

    def _scored_again_alone(self, item: ClaimedSeries, why: str) -> bool:
        """A failure that may not be the series' own (a helper died, out of
        memory or in a decoder, and took its pool's work with it; the model
        failed on a batch it shared): the series is scored again, once, alone."""
        if item.key in self._retried_once:
            return False
        logger.warning("series %s is scored again, alone: %s", item.series_uid, why)
        self._retried_once.add(item.key)
        self._put_back.append(item)
        return True

    def _again_alone_or_fail(self, item: ClaimedSeries, reason: str) -> None:
        if not self._scored_again_alone(item, reason):
            self._fail_or_keep(item, reason)

    def _fail_or_keep(self, item: ClaimedSeries, reason: str) -> None:
        """:meth:`_fail`; where even that cannot be recorded for want of the
        database, the series is kept to be put back at the next round's start.
        Any other error would recur at every try: the series is only marked
        failed, without a result."""
        try:
            self._fail(item, reason)
        except OperationalError:
            logger.exception("recording series %s failed did not succeed either; it is scored again", item.series_uid)
            self._put_back.append(item)
        except Exception:
            logger.exception("recording series %s failed did not succeed either; it is left failed", item.series_uid)
            with db.transaction(self.sessions) as session:
                session.execute(update(db.Series).where(*_as_claimed(item)).values(state=db.FAILED))

    def _put_back_series(self) -> None:
        """Series kept to be scored again (see ``_put_back``) go back to complete."""
        if not self._put_back:
            return
        try:
            with db.transaction(self.sessions) as session:
                for item in self._put_back:
                    session.execute(
                        update(db.Series).where(*_as_claimed(item)).values(state=db.COMPLETE, claimed_at=None)
                    )
        except Exception:
            logger.exception("putting back %d series to be scored again failed", len(self._put_back))
            return
        self._put_back.clear()

    def _store(self, item: ClaimedSeries, scored: Scored | None) -> None:
        if scored is None:
            skip = item.prepared.skip
            current = self._finish(item, status=db.SKIPPED, skip_reason=skip)
            logger.info("series %s skipped: %s%s", item.series_uid, skip, "" if current else _NOT_CURRENT)
            return
        reports, note = self._built_reports(item, scored)
        current = self._finish(
            item,
            status=db.SCORED,
            skip_reason=note,
            scores=scored.scores,
            flags=scored.flags,
            key_sop_instance_uid=item.sop_uids[scored.key],
            slice_probs=scored.probs,
            reports=reports,
            targets=scored.targets,
        )
        positive = [label for label in LABELS if scored.flags[label]]
        logger.info(
            "series %s scored (version %d, %d slices, %d quarantined): %s%s",
            item.series_uid,
            item.version,
            len(item.sop_uids),
            item.quarantined_count,
            ", ".join(positive) or "no hemorrhage flagged",
            "" if current else _NOT_CURRENT,
        )

    @staticmethod
    def _built_reports(item: ClaimedSeries, scored: Scored) -> tuple[list[tuple[str, str, str]], str | None]:
        """The spooled report objects, or none and why: reports that cannot
        be built (a full disk) must not cost the series its scores."""
        if scored.reports is None:
            return [], None
        try:
            return scored.reports.result()[0], None
        except BrokenProcessPool:
            raise  # the helper died: the series is scored again
        except Exception as exc:
            logger.exception("the reports of series %s could not be built", item.series_uid)
            # One line: pydicom's write errors carry a traceback in their text.
            first_line = (str(exc).splitlines() or [""])[0]
            return [], f"{db.REPORTS_NOT_BUILT}: {type(exc).__name__}: {first_line}"

    # -- recording -------------------------------------------------------
    def destinations(self, calling_ae: str | None, peer_host: str | None = None) -> list[tuple[str, str, int]]:
        """Where reports of a series from ``calling_ae`` at ``peer_host`` go:
        destinations, then the sender."""
        wanted = [(d.ae_title, d.host, d.port) for d in self.config.reports.destinations]
        if self.config.reports.return_to_sender and not calling_ae:
            logger.warning("reports.return_to_sender is set but the series has no known sender")
        elif self.config.reports.return_to_sender:
            sender = _sender_address(self.config.access.allow, calling_ae, peer_host)
            if sender is None:
                logger.warning(
                    "reports.return_to_sender is set but access.allow gives no one host and port for %s at %s",
                    calling_ae,
                    peer_host,
                )
            else:
                wanted.append(sender)
        # One PACS named two ways ("pacs.hospital.local" and its address) gets each report once.
        targets: list[tuple[str, str, int]] = []
        for ae_title, host, port in wanted:
            if not any(ae_title == a and port == p and (host == h or _is_at(host, h)) for a, h, p in targets):
                targets.append((ae_title, host, port))
        return targets

    def _finish(
        self,
        item: ClaimedSeries,
        *,
        status: str,
        skip_reason: str | None = None,
        scores: dict[str, float] | None = None,
        flags: dict[str, bool] | None = None,
        key_sop_instance_uid: str | None = None,
        slice_probs: np.ndarray | None = None,
        reports: Sequence[tuple[str, str, str]] = (),
        targets: Sequence[tuple[str, str, int]] = (),
    ) -> bool:
        """Record the outcome; whether it is the series' current result (its reports queued)."""
        card = self.model.card
        now = db.utcnow()
        with db.transaction(self.sessions) as session:
            # Only a series still in the state we claimed it in moves on; if
            # slices arrived meanwhile it is receiving again and this result
            # is superseded at once by the next version.
            current = session.execute(update(db.Series).where(*_as_claimed(item)).values(state=status)).rowcount
            if current:
                # A stale result (a newer version is on its way, or already
                # recorded) must touch nothing of the newer one: not even the
                # slices it quarantined, which may have been sent again since.
                for instance_id, reason in item.quarantined.items():
                    # An image re-filed into another series since it was read is no longer this one's to judge.
                    session.execute(
                        update(db.Instance)
                        .where(db.Instance.id == instance_id, db.Instance.series_id == item.series_id)
                        .values(quarantine_reason=reason)
                    )
                    uid = session.scalar(select(db.Instance.sop_instance_uid).where(db.Instance.id == instance_id))
                    logger.warning("quarantined %s of series %s: %s", uid, item.series_uid, reason)
            replaces = current and not _older_result_stands(session, item)
            if replaces:
                _supersede_older_results(session, item.series_id)
            result = db.SeriesResult(
                series_id=item.series_id,
                version=item.version,
                status=status,
                skip_reason=skip_reason,
                model_name=card.name,
                model_version=card.version,
                scores=scores,
                flags=flags,
                thresholds=dict(self.thresholds) if scores else None,
                key_sop_instance_uid=key_sop_instance_uid,
                slice_count=len(item.sop_uids),
                quarantined_count=item.quarantined_count,
                created_at=now,
                superseded=not replaces,
            )
            session.add(result)
            session.flush()
            if slice_probs is not None:
                # One multi-row INSERT, not an ORM object per slice: this thread
                # holds the interpreter lock the model's thread needs.
                session.execute(
                    insert(db.SliceResult),
                    [
                        {
                            "result_id": result.id,
                            "sop_instance_uid": sop_uid,
                            "position": position,
                            "scores": dict(zip(LABELS, row)),
                        }
                        for position, (sop_uid, row) in enumerate(zip(item.sop_uids, slice_probs.tolist()))
                    ],
                )
            if replaces:
                for ae_title, host, port in targets:
                    for kind, sop_uid, path in reports:
                        session.add(
                            db.Delivery(
                                result_id=result.id,
                                kind=kind,
                                sop_instance_uid=sop_uid,
                                path=path,
                                ae_title=ae_title,
                                host=host,
                                port=port,
                                state=db.QUEUED,
                                next_attempt_at=now,
                            )
                        )
        if not replaces:
            # Reports of a result that is not current are never sent, so nothing else would remove them.
            for _, _, path in reports:
                self.spool.remove(path)
        return bool(replaces)

    def _fail(self, item: ClaimedSeries, reason: str) -> None:
        with db.transaction(self.sessions) as session:
            current = session.execute(update(db.Series).where(*_as_claimed(item)).values(state=db.FAILED)).rowcount
            replaces = current and not _older_result_stands(session, item)
            session.add(
                db.SeriesResult(
                    series_id=item.series_id,
                    version=item.version,
                    status=db.FAILED,
                    skip_reason=reason,
                    model_name=self.model.card.name,
                    model_version=self.model.card.version,
                    superseded=not replaces,
                )
            )


def _as_claimed(item: ClaimedSeries) -> tuple[Any, ...]:
    """Conditions on the series row that hold while it is as ``item`` claimed
    it: processing, the same version (late slices make a new one)."""
    return (db.Series.id == item.series_id, db.Series.state == db.PROCESSING, db.Series.version == item.version)


def _predecessors(sr_states: Sequence[tuple[int, str]]) -> tuple[int, ...]:
    """Of the (version, delivery state) of earlier SRs, the versions a new SR
    replaces: the newest one sent, which the PACS holds, and any after it on
    its way, which it may get meanwhile (one superseded before it went never will)."""
    sent = max((version for version, state in sr_states if state == db.SENT), default=0)
    on_its_way = {version for version, state in sr_states if state != db.SENT and version > sent}
    return tuple(sorted(on_its_way | ({sent} if sent else set())))


def _older_result_stands(session: Session, item: ClaimedSeries) -> bool:
    """Whether the series' current scored result stays current although
    ``item``, a newer version, is done: retention removed images that result
    was scored from, so ``item`` holds only what arrived since (a late slice,
    part of the study sent again) and cannot judge the whole series. Sent
    again in full (as many slices, under their UIDs or new ones), the new
    version replaces it."""
    if item.version <= 1:
        return False
    older = db.current_scored_result(session, item.series_id, before_version=item.version)
    if older is None or len(item.sop_uids) >= (older.slice_count or 0):
        return False
    removed = db.slices_removed(session, older.id)
    if removed:
        logger.warning(
            "series %s version %d holds only images that arrived after retention removed %d it was scored "
            "from; the result of those stays current, this one is recorded but not reported",
            item.series_uid,
            item.version,
            removed,
        )
    return bool(removed)


def _supersede_older_results(session: Session, series_id: int) -> None:
    """Mark the series' earlier results superseded; their reports not yet
    delivered are no longer worth sending."""
    session.execute(
        update(db.SeriesResult)
        .where(db.SeriesResult.series_id == series_id, db.SeriesResult.superseded.is_(False))
        .values(superseded=True)
    )
    older = select(db.SeriesResult.id).where(db.SeriesResult.series_id == series_id)
    session.execute(
        update(db.Delivery)
        .where(db.Delivery.result_id.in_(older), db.Delivery.state.in_(db.UNDELIVERED))
        .values(state=db.SUPERSEDED, last_error="superseded by a newer result")
    )


def plan_batches(lengths: Sequence[int], size: int) -> list[list[tuple[int, int, int]]]:
    """Model batches of ``size`` slices over series of ``lengths`` slices, in
    order: for each batch, its (series index, first slice, slice count) runs,
    at most :data:`RUNS_PER_BATCH` of them."""
    batches: list[list[tuple[int, int, int]]] = [[]]
    filled = 0
    for index, count in enumerate(lengths):
        start = 0
        while start < count:
            if filled == size or len(batches[-1]) == RUNS_PER_BATCH:
                batches.append([])
                filled = 0
            take = min(size - filled, count - start)
            batches[-1].append((index, start, take))
            filled += take
            start += take
    return batches if filled else []


def batch_buffers(card: ModelCard, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Zeroed rows and neighbours buffers for one batch of :func:`gather_batch`:
    room for ``size`` slices and the neighbours beyond the ends of every run."""
    span = 2 * card.context_slices + 1
    capacity = size + (span - 1) * RUNS_PER_BATCH
    rows = np.zeros((capacity, *card.input_size, len(card.windows)), dtype=np.float32)
    return rows, np.zeros((size, span), dtype=np.int32)


def gather_batch(
    volumes: Sequence[np.ndarray],
    runs: Sequence[tuple[int, int, int]],
    context: int,
    rows: np.ndarray,
    neighbours: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """One batch for :meth:`HemorrhageModel.slice_stage_on_rows`, written into
    (the start of) ``rows`` and ``neighbours``: each run's slices and the
    neighbours beyond its ends, each slice copied once."""
    used = filled = 0
    for index, start, take in runs:
        volume = volumes[index]
        wanted = imaging.context_indices(len(volume), context, range(start, start + take))
        first, end = int(wanted[0, 0]), int(wanted[-1, -1]) + 1
        rows[used : used + end - first] = volume[first:end]
        neighbours[filled : filled + take] = wanted - first + used
        used += end - first
        filled += take
    # The whole rows buffer, the rows past ``used`` stale: one shape for JAX to compile.
    return rows, neighbours[:filled]


def _sender_address(allow: Sequence[Peer], calling_ae: str, peer_host: str | None) -> tuple[str, str, int] | None:
    """The allow entry of the sender: its AE title, and where several entries
    share it (scanners keep their factory AE titles), the one whose host is
    where the series came from; None when that does not name one."""
    named = [peer for peer in allow if peer.ae_title == calling_ae]
    if len(named) > 1:  # the entry of the series' host, else one that admits any host
        at_host = [peer for peer in named if peer.host and peer_host and _is_at(peer_host, peer.host)]
        named = at_host or [peer for peer in named if peer.host is None]
    if len(named) != 1 or not (named[0].host and named[0].port):
        return None
    return (named[0].ae_title, named[0].host, named[0].port)


def _is_at(address: str, host: str) -> bool:
    try:
        return address in host_addresses(host)
    except OSError:  # a name that does not resolve now: only itself
        return address == host


def describe_device() -> str:
    """The Keras backend and the accelerators it sees, for the start-up log."""
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            gpus = [device.name for device in tf.config.list_physical_devices("GPU")]
        elif backend == "torch":
            import torch

            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        elif backend == "jax":
            import jax

            gpus = [str(device) for device in jax.devices() if device.platform == "gpu"]
        else:
            gpus = []
    except Exception as exc:  # listing devices must never stop the node
        return f"{backend} backend (devices unknown: {exc})"
    return f"{backend} backend, " + (f"GPU: {', '.join(gpus)}" if gpus else "CPU")


def requeue_interrupted(sessions: sessionmaker[Session]) -> int:
    """At start-up: series left processing by a crash go back to complete."""
    with db.transaction(sessions) as session:
        return session.execute(
            update(db.Series).where(db.Series.state == db.PROCESSING).values(state=db.COMPLETE, claimed_at=None)
        ).rowcount
