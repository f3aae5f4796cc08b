"""Wires the node together: database, spool, receiver and the periodic jobs.

``ichnode serve`` runs every component as a thread of one process. They share
nothing but the database and the spool, so they can also run as separate
processes (``--components``), and a restart resumes from the rows: pending
series are completed, interrupted scoring is redone, due deliveries are
retried, files whose row was lost are re-indexed.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from pydicom import dcmread
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from . import db
from .config import Config, keras_backend
from .dispatch import Dispatcher, shift_due_times
from .dispatch import requeue_interrupted as requeue_interrupted_deliveries
from .logs import setup_logging
from .model import HemorrhageModel, ModelCardError, load_model
from .receiver import start_receiver
from .retention import purge_expired
from .series import (
    REPORTS_TRIES,
    InstanceHeader,
    complete_stable_series,
    register_instance,
    restamp_future_receipts,
    score_again,
    unreported_series,
)
from .spool import Spool, SpoolInUse, SpoolOfAnotherDatabase, spool_owner
from .worker import Worker, describe_device, requeue_interrupted

logger = logging.getLogger(__name__)

# How long SIGTERM waits for open associations to finish before aborting them.
SHUTDOWN_GRACE_SECONDS = 20.0

# How often spooled files past storage.retention_days are looked for.
RETENTION_CHECK_SECONDS = 3600.0

# After the spool was short of room, how long series wait before they are
# completed: time for senders to send again the images that were refused.
ROOM_GRACE_SECONDS = 300.0

# How often series whose reports could not be built (a full disk) are looked
# for, to be scored again once the spool has room (series.REPORTS_TRIES).
UNREPORTED_CHECK_SECONDS = 600.0

# The scheduler's ticks are wall-clock times: a system clock stepped back (an
# NTP correction, a virtual machine restored) would hold every stage back
# as long. Checked this often; a step back of more than this runs them now.
CLOCK_CHECK_SECONDS = 1.0
CLOCK_STEP_SECONDS = 2.0

RECEIVER, WORKER, DISPATCHER = "receiver", "worker", "dispatcher"

# Scheduler jobs. Each runs on its interval; a stage that hands work to the
# next one in the same process wakes that job at once instead.
COMPLETION_JOB, SCORING_JOB, DELIVERY_JOB, RETENTION_JOB = "completion", "scoring", "delivery", "retention"
UNREPORTED_JOB = "unreported"
ALL_COMPONENTS = (RECEIVER, WORKER, DISPATCHER)


class CannotListen(Exception):
    """The receiver cannot listen as configured; the message names the keys."""


class CannotStart(Exception):
    """A :class:`Node` cannot be made; the message says why, in one line."""


@contextmanager
def explained_start_failures() -> Iterator[None]:
    """Around making a :class:`Node`: what an administrator can fix (the
    database, spool, model, Keras backend) becomes :class:`CannotStart`."""
    try:
        yield
    except (db.DatabaseUnreadable, ModelCardError, OSError, ValueError, SpoolInUse, SpoolOfAnotherDatabase) as exc:
        raise CannotStart(f"cannot start: {exc}") from None
    except ImportError as exc:  # KERAS_BACKEND names a backend this environment lacks
        raise CannotStart(
            f"cannot start: Keras backend {keras_backend()!r} (KERAS_BACKEND) cannot be loaded "
            f"in this environment: {exc}"
        ) from None


class Node:
    """One ichnode: call :meth:`start`, then :meth:`stop` (or :meth:`run` to block)."""

    def __init__(
        self,
        config: Config,
        *,
        components: Sequence[str] = ALL_COMPONENTS,
        model: HemorrhageModel | None = None,
        receiver_index: int = 0,
    ) -> None:
        unknown = set(components) - set(ALL_COMPONENTS)
        if unknown:
            raise ValueError(f"unknown components {sorted(unknown)}, expected some of {ALL_COMPONENTS}")
        self.config = config
        self.components = tuple(components)
        # Receiver processes after the first (node.receiver_processes) only
        # receive; the first one also does the start-up recovery.
        self.receiver_index = receiver_index
        self._extra_receivers: list[multiprocessing.process.BaseProcess] = []
        # A new database over a spool that is not its own is refused before it
        # is made: made, it would stay, and status would show an empty node.
        self.engine = db.open_node_database(
            config.database.url,
            before_creating=lambda: spool_owner(config.storage.spool_dir, None, database_is_empty=True),
        )
        self.sessions = db.session_factory(self.engine)
        self.spool = Spool(
            config.storage.spool_dir,
            min_free_mb=config.storage.min_free_mb,
            fsync=config.storage.fsync,
        )
        self._roles: list[int] = []  # file descriptors of the spool roles held (Spool.hold_role)
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(4)},
            job_defaults={"coalesce": True, "max_instances": 1},
            timezone="UTC",
        )
        self.server = None
        self.worker: Worker | None = None
        self.dispatcher: Dispatcher | None = None
        try:  # a node that cannot start lets go of what it took
            with self.sessions() as session:
                empty = session.scalar(select(db.Series.id).limit(1)) is None
            self.spool.claim_for(db.installation(self.sessions), database_is_empty=empty)
            # One of each stage per spool (the extra receiver processes are the first's).
            for role in self.components:
                if role != RECEIVER or receiver_index == 0:
                    self._roles.append(self.spool.hold_role(role))
            if WORKER in self.components:
                # Loaded before anything starts: a bad model or card refuses to start.
                self.worker = Worker(config, self.sessions, self.spool, model or load_model(config.model.path))
                logger.info("scoring on %s", describe_device())
            if DISPATCHER in self.components:
                self.dispatcher = Dispatcher(
                    self.sessions,
                    self.spool,
                    config.reports.retry,
                    calling_ae=config.node.ae_title,
                    timeout=config.reports.timeout_seconds,
                )
        except BaseException:
            self._let_go()
            raise
        self._stopped = threading.Event()  # stop has begun
        self._done = threading.Event()  # stop has ended
        # Jobs running now (see _run_job); stop waits for them to finish.
        self._running_jobs = 0
        self._jobs_idle = threading.Condition()
        self._database_lock = threading.Lock()
        self._room_lock = threading.Lock()
        self._room_short = False
        self._database_down_since: float | None = None

    @property
    def port(self) -> int:
        assert self.server is not None, "the node is not started"
        return int(self.server.server_address[1])

    def start(self) -> None:
        interval = self.config.series.check_interval_seconds
        primary = self.receiver_index == 0
        if RECEIVER in self.components and primary:
            self.spool.clear_tmp()
            reindexed = reindex_spool(self)
            if reindexed:
                logger.warning("re-indexed %d spooled files that had no database row", reindexed)
        if primary:
            # Once per node (its first process). Completion is a conditional
            # row update, so a second node on the same database is harmless.
            self._add_job(COMPLETION_JOB, self.complete_series, interval)
            self._add_job(RETENTION_JOB, self.purge_expired, RETENTION_CHECK_SECONDS)
        if self.worker is not None:
            # Assumes one worker process per database: a series another live
            # worker is scoring would be scored twice (harmless, versioned).
            requeued = requeue_interrupted(self.sessions)
            if requeued:
                logger.warning("scoring of %d series was interrupted; scoring them again", requeued)
            self._add_job(SCORING_JOB, self.score, interval)
            self._add_job(UNREPORTED_JOB, self.score_unreported_again, UNREPORTED_CHECK_SECONDS)
        if self.dispatcher is not None:
            # Like the worker: assumes one dispatcher process per database.
            requeued = requeue_interrupted_deliveries(self.sessions, self.config.reports.retry)
            if requeued:
                logger.warning("delivery of %d reports was interrupted; sending them again", requeued)
            # Starts each destination's batch and returns: one that does not
            # answer must not hold back the next round's other destinations.
            self._add_job(DELIVERY_JOB, self.dispatcher.start_round, interval)
        if RECEIVER in self.components:
            # Bound before the scheduler starts: a node that cannot listen
            # stops here with nothing running.
            self.server = self._listen()
        self.scheduler.start()
        threading.Thread(target=self._watch_clock, name="ichnode-clock", daemon=True).start()
        if RECEIVER in self.components and primary:
            self._start_extra_receivers()

    def _watch_clock(self) -> None:
        offset = wall_minus_monotonic()
        while not self._stopped.wait(CLOCK_CHECK_SECONDS):
            now = wall_minus_monotonic()
            if now < offset - CLOCK_STEP_SECONDS:
                self._after_clock_went_back(offset - now)
            offset = now

    def _after_clock_went_back(self, seconds: float) -> None:
        logger.warning("the system clock went back %.0f s; every stage runs now", seconds)
        try:
            if self.receiver_index == 0:
                restamp_future_receipts(self.sessions)
            if self.dispatcher is not None:
                shift_due_times(self.sessions, seconds)
            for job in self.scheduler.get_jobs():
                job.modify(next_run_time=dt.datetime.now(dt.UTC))
        except Exception:  # the next check tries nothing again: the stages' own ticks go on
            logger.exception("catching up with the clock failed")

    def _listen(self) -> ThreadedAssociationServer:
        node = self.config.node
        try:
            return start_receiver(self.config, self.spool, self.sessions, index=self.receiver_index)
        except ValueError as exc:  # pynetdicom refuses the AE title
            raise CannotListen(f"cannot listen as {node.ae_title!r} (node.ae_title): {exc}") from exc
        except OSError as exc:  # port in use, address not ours, host unknown
            raise CannotListen(
                f"cannot listen on {node.host}:{node.port} (node.host/node.port): {exc.strerror or exc}"
            ) from exc

    def _start_extra_receivers(self) -> None:
        # The others bind the port the first one got (it may have been 0).
        node = self.config.node.model_copy(update={"port": self.port})
        config = self.config.model_copy(update={"node": node})
        spawn = multiprocessing.get_context("spawn")
        for index in range(1, self.config.node.receiver_processes):
            process = spawn.Process(
                target=run_extra_receiver, args=(config, index), name=f"ichnode-receiver-{index}", daemon=False
            )
            process.start()
            self._extra_receivers.append(process)

    def _add_job(self, job_id: str, func: Callable[[], object], seconds: float) -> None:
        self.scheduler.add_job(self._run_job, "interval", args=(func,), seconds=seconds, id=job_id, name=job_id)

    def _run_job(self, func: Callable[[], object]) -> object:
        # Counted here, not left to the scheduler's shutdown(wait=True): that
        # waits holding the scheduler's lock, which a running job needs to wake
        # the next one, and the node would never stop.
        with self._jobs_idle:
            if self._stopped.is_set():
                return None  # queued before the stop, started after it
            self._running_jobs += 1
        try:
            result = func()
        except OperationalError as exc:
            self._database_failed(exc)
            return None
        finally:
            with self._jobs_idle:
                self._running_jobs -= 1
                self._jobs_idle.notify_all()
        self._database_answered()
        return result

    # While the spool is short of room (storage.min_free_mb) the receiver
    # refuses images, so a series quiet since may only be waiting for its
    # refused images to be sent again: none is completed until the senders
    # had ROOM_GRACE_SECONDS to send them again (a restart meanwhile
    # included), and none is scored while the room lasts short (its model
    # input and reports would take what is left).
    def _room_shortage(self) -> str | None:
        shortage = self.spool.room_shortage()
        with self._room_lock:
            started, ended = shortage is not None and not self._room_short, shortage is None and self._room_short
            self._room_short = shortage is not None
        if started:
            logger.warning("%s: no series is completed or scored until there is room", shortage)
        if ended:
            logger.info(
                "the spool has room again: series are completed %.0f s after the last image refused",
                ROOM_GRACE_SECONDS,
            )
        return shortage

    def _refused_images_may_come(self) -> bool:
        short_at = self.spool.room_short_at()
        if short_at is None:
            return False
        if time.time() - short_at < ROOM_GRACE_SECONDS:
            return True
        self.spool.forget_room_shortage()
        logger.info("series are completed again")
        return False

    # A database that does not answer (a server down for an hour) fails every
    # stage at every tick: one line when it starts and one when it ends, not
    # a traceback per stage per second.
    def _database_failed(self, exc: OperationalError) -> None:
        with self._database_lock:
            first = self._database_down_since is None
            if first:
                self._database_down_since = time.monotonic()
        if first:
            logger.warning("the database fails (%s); every stage tries again at each tick", db.error_text(exc))
        else:
            logger.debug("the database still fails: %s", db.error_text(exc))

    def _database_answered(self) -> None:
        """After a job ran through: if the database failed before, it answers
        again only if it answers now (the job may not have asked it)."""
        with self._database_lock:
            since = self._database_down_since
        if since is None:
            return
        try:
            with self.sessions() as session:
                session.execute(select(1))
        except OperationalError:
            return
        with self._database_lock:
            self._database_down_since = None
        logger.info("the database answers again, after %.0f s", time.monotonic() - since)

    def _wake(self, job_id: str) -> None:
        """Run a job now rather than at its next tick (the next stage has work)."""
        if self._stopped.is_set():
            return  # no next tick is coming
        job = self.scheduler.get_job(job_id)
        if job is not None:
            job.modify(next_run_time=dt.datetime.now(dt.UTC))

    def complete_series(self) -> list[str]:
        if self._room_shortage() or self._refused_images_may_come():
            return []
        completed = complete_stable_series(self.sessions, self.config.series.stable_seconds)
        if completed:
            self._wake(SCORING_JOB)
        return completed

    def score(self) -> int:
        assert self.worker is not None
        if self._room_shortage():
            return 0
        handled = self.worker.run_once()
        if handled:
            self._wake(DELIVERY_JOB)
        return handled

    def score_unreported_again(self) -> int:
        """Queue the series whose reports could not be built to be scored
        again, while the spool has room; returns how many were queued."""
        if self.spool.room_shortage():
            return 0
        with self.sessions() as session:
            ids = unreported_series(session, tried_fewer_than=REPORTS_TRIES)
        queued = score_again(self.sessions, ids).queued
        if queued:
            logger.warning("%d series whose reports could not be built are scored again", len(queued))
            self._wake(SCORING_JOB)
        return len(queued)

    def purge_expired(self) -> int:
        return purge_expired(self.sessions, self.spool, self.config.storage.retention_days)

    def stop(self, grace_seconds: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Stop accepting, let open associations finish (then abort them), stop jobs."""
        if self._stopped.is_set():
            self._done.wait()  # a second caller returns once the first has stopped it
            return
        self._stopped.set()
        try:
            # The jobs under way finish what they hold and take nothing more.
            for stage in (self.worker, self.dispatcher):
                if stage is not None:
                    stage.stop()
            for process in self._extra_receivers:
                process.terminate()  # SIGTERM: the same graceful stop as this one
            if self.server is not None:
                associations = list(self.server.active_associations)
                self.server.shutdown()
                deadline = time.monotonic() + grace_seconds
                for assoc in associations:
                    assoc.join(max(0.0, deadline - time.monotonic()))
                    if assoc.is_alive():
                        logger.warning("aborting association from %s at shutdown", assoc.requestor.ae_title)
                        assoc.abort()
            for process in self._extra_receivers:
                process.join(grace_seconds + 5)
                if process.is_alive():
                    process.kill()
            if self.scheduler.running:
                self.scheduler.shutdown(wait=False)
            with self._jobs_idle:
                self._jobs_idle.wait_for(lambda: self._running_jobs == 0)
            if self.dispatcher is not None:
                self.dispatcher.wait()  # the batches it started, each within its timeouts
            if self.worker is not None:
                self.worker.close()
            self._let_go()
        finally:
            self._done.set()
        logger.info("stopped")

    def _let_go(self) -> None:
        for fd in self._roles:
            os.close(fd)
        self._roles = []
        self.engine.dispose()

    def run(self) -> None:
        """Start and block until SIGTERM or SIGINT, then stop cleanly; SIGHUP is ignored."""
        wake = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            logger.info("received %s, shutting down", signal.Signals(signum).name)
            wake.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        ignore_hangups()
        try:
            self.start()
        except BaseException:
            self.stop(grace_seconds=0)  # let go of what did start
            raise
        wake.wait()
        self.stop()


def ignore_hangups() -> None:
    """SIGHUP (logrotate, `systemctl kill -s HUP`) would end a process of the
    node at once, a stop systemd takes as clean (no restart). Ignored, and so
    by every process it starts (helpers, extra receivers, multiprocessing's
    resource tracker): nothing is read again, the configuration is read at
    start and the log is stderr."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def wall_minus_monotonic() -> float:
    """The wall clock less the monotonic one: it drops when the system clock is set back."""
    return time.time() - time.monotonic()


def run_extra_receiver(config: Config, index: int) -> None:
    """Entry point of receiver process ``index`` (>= 1) of a node."""
    ignore_hangups()
    _die_with_parent()
    # The main process's log set-up (quiet libraries, UID warnings at DEBUG): a
    # spawned process starts without it.
    setup_logging(config.logging.level, process=f"receiver-{index}")
    Node(config, components=(RECEIVER,), receiver_index=index).run()


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the node's main process dies (even by SIGKILL),
    so no orphan keeps receiving on the port."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        logger.warning("cannot tie receiver process to its parent's life (not Linux?)")


def reindex_spool(node: Node) -> int:
    """Record spooled instance files that have no row.

    A file is renamed into the spool before its row is written. A crash
    between the two leaves a whole image that was never acknowledged; a power
    loss may also take SQLite's last commits (synchronous=NORMAL) of images
    that were. Either way the file is whole: index it again, unless its SOP
    Instance is recorded with another file that exists (a duplicate's copy).
    """
    with node.sessions() as session:
        known = set(session.scalars(select(db.Instance.path)))
    count = 0
    for path in node.spool.iter_instance_files():
        relative = path.relative_to(node.spool.root).as_posix()
        if relative in known:
            continue
        try:
            ds = dcmread(path, stop_before_pixels=True)
            meta = ds.file_meta
            header = InstanceHeader.from_dataset(
                ds,
                sop_class_uid=str(meta.get("MediaStorageSOPClassUID", "")),
                sop_instance_uid=str(meta.get("MediaStorageSOPInstanceUID", "")),
            )
        except Exception as exc:
            logger.error("spooled file %s is unreadable (%s); left in place", relative, exc)
            continue
        with node.sessions() as session:
            recorded = session.scalar(
                select(db.Instance.path).where(db.Instance.sop_instance_uid == header.sop_instance_uid)
            )
        if recorded is not None and node.spool.absolute(recorded).exists():
            # The other copy of a duplicate, left by a crash before it was
            # removed: the recorded copy stands (recording this one would
            # swap them at every start).
            logger.warning("removing %s: a second copy of %s, recorded as %s", relative, header.sop_instance_uid, recorded)
            path.unlink()
            continue
        register_instance(
            node.sessions, header, path=relative, size_bytes=path.stat().st_size, calling_ae=None, peer_host=None
        )
        count += 1
    return count
