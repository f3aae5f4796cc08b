"""The dispatcher: C-STORE queued report objects, retrying until they are stored.

Every delivery is a row (:class:`ichnode.db.Delivery`); its attempts and next
attempt time live in the database, so backoff survives restarts. Only a
Success status marks a delivery sent: a warning or failure status, a refused
association or a dead peer are all retried with exponential backoff until
``reports.retry.max_attempts``, after which the delivery is dead-lettered
with its last error (shown by ``ichnode status``). A resend reuses the same
file, hence the same SOP Instance UID, so the PACS never holds two copies.

Delivery life cycle (``Delivery.state``)::

    queued --due, claimed by one dispatcher--> sending --> sent
    sending --failed--> queued (next try after a backoff) | dead
    queued | sending --the worker stores a newer result--> superseded
    sending --the dispatcher crashed--> queued   (at the next start-up; the one on the wire: an attempt more, or dead)
    sending --the node stops before its C-STORE--> queued
    dead --``ichnode requeue``--> queued   (attempts from 0; ``--to`` gives it a new address)

Each destination's due deliveries are sent over one association in a thread
of their own, so a destination that is down or does not answer delays only
its own reports; it gets no second batch while one is under way.

The claim is a conditional update, so two dispatchers on one database never
send the same delivery, and a failure is recorded only on a row still
``sending``: a report superseded during its C-STORE stays superseded. A
Success is recorded whatever the state: the PACS holds the object. One the
database fails to record stays ``sending`` (no other round claims it) and is
recorded at the start of the next round, or at the stop; a node that stops
before the database answers again sends it once more at its next start.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from . import db
from .config import RetryConfig
from .scu import associate, client_ae, request_store_contexts, status_category
from .spool import Spool

logger = logging.getLogger(__name__)


Destination = tuple[str, str, int]  # (AE title, host, port)


# Recorded on the delivery that was on the wire when the dispatcher stopped.
INTERRUPTED = "interrupted: the dispatcher stopped during the C-STORE"


def requeue_interrupted(sessions: sessionmaker[Session], retry: RetryConfig) -> int:
    """At start-up: deliveries left sending by a crashed dispatcher go back to queued.

    A batch sends its destination's deliveries in id order, so of those left
    sending the first was on the wire: that try counts as an attempt (the
    last one: dead-lettered), so that a report whose sending brings the node
    down every time is not retried for ever; the others were not tried.

    Assumes no other dispatcher on this database is sending right now: its
    deliveries under way would be queued again and might be sent twice.
    """
    with db.transaction(sessions) as session:
        left = session.scalars(
            select(db.Delivery).where(db.Delivery.state == db.SENDING).order_by(db.Delivery.id)
        ).all()
        on_the_wire = {}
        for delivery in left:
            on_the_wire.setdefault(_destination(delivery), delivery)
        for delivery in on_the_wire.values():
            delivery.attempts += 1
            delivery.last_error = INTERRUPTED
            delivery.state = db.DEAD if delivery.attempts >= retry.max_attempts else db.QUEUED
        _unclaim(session, [d.id for d in left if d not in on_the_wire.values()])
        return len(left)


def _unclaim(session: Session, ids: Sequence[int]) -> int:
    """Deliveries ``ids`` still sending back to queued, as they were before their claim."""
    return session.execute(
        update(db.Delivery).where(db.Delivery.id.in_(ids), db.Delivery.state == db.SENDING).values(state=db.QUEUED)
    ).rowcount


@dataclass
class DeadLetters:
    """What :func:`requeue_dead` did with the dead letters it found."""

    requeued: list[db.Delivery] = field(default_factory=list)
    file_gone: list[db.Delivery] = field(default_factory=list)  # the report can no longer be sent
    superseded: list[db.Delivery] = field(default_factory=list)  # its series has a newer result
    redirected: int = 0  # deliveries still queued to ``destination``, given the new address


def requeue_dead(
    sessions: sessionmaker[Session],
    spool_dir: Path,
    destination: Destination | None = None,
    to: Destination | None = None,
) -> DeadLetters:
    """Dead letters (all, or one destination's) go back to queued, due now with
    attempts from 0: the running dispatcher sends them at its next round.

    Not one whose spooled report file is gone, nor one of a superseded result:
    that report would reach the PACS after the newer one.

    A delivery keeps the address it was made with, so after a wrong address in
    ``reports.destinations`` is corrected, its dead letters would go to the
    old one again: ``to`` gives the letters requeued that new address and,
    with ``destination``, the deliveries still queued to ``destination`` too
    (as new). Without ``destination``, ``to`` needs the letters to share one
    address: reports meant for several PACS must not all go to one.
    """
    found = DeadLetters()
    query = select(db.Delivery).join(db.SeriesResult).where(db.Delivery.state == db.DEAD).order_by(db.Delivery.id)
    if destination is not None:
        query = query.where(*_to(destination))
    with db.transaction(sessions) as session:
        sendable = []
        for delivery in session.scalars(query):
            if delivery.result.superseded:
                found.superseded.append(delivery)
            elif not (spool_dir / delivery.path).is_file():
                found.file_gone.append(delivery)
            else:
                sendable.append(delivery)
        addresses = sorted({_destination(d) for d in sendable})
        if to is not None and destination is None and len(addresses) > 1:
            raise ValueError(
                "the dead letters go to "
                + ", ".join(f"{ae_title}@{host}:{port}" for ae_title, host, port in addresses)
                + "; choose one of them with --destination"
            )
        for delivery in sendable:
            if _requeue_if_current(session, delivery, to):
                found.requeued.append(delivery)
            else:  # the worker stored a newer result meanwhile
                found.superseded.append(delivery)
        if to is not None and destination is not None and to != destination:
            ae_title, host, port = to
            found.redirected = session.execute(
                update(db.Delivery)
                .where(db.Delivery.state == db.QUEUED, *_to(destination))
                .values(
                    ae_title=ae_title, host=host, port=port, attempts=0, last_error=None, next_attempt_at=db.utcnow()
                )
                .execution_options(synchronize_session=False)
            ).rowcount
    return found


def shift_due_times(sessions: sessionmaker[Session], seconds: float) -> int:
    """After the system clock went back ``seconds``: each queued delivery is
    due as much earlier, as it was before (a report queued "now" just before
    the step would otherwise wait that long). Returns how many."""
    step = dt.timedelta(seconds=seconds)
    with db.transaction(sessions) as session:
        due = session.execute(
            select(db.Delivery.id, db.Delivery.next_attempt_at).where(
                db.Delivery.state == db.QUEUED, db.Delivery.next_attempt_at > db.utcnow()
            )
        ).all()
        for delivery_id, at in due:
            session.execute(
                update(db.Delivery)
                .where(db.Delivery.id == delivery_id, db.Delivery.state == db.QUEUED)
                .values(next_attempt_at=at - step)
            )
    return len(due)


def _to(destination: Destination) -> tuple:
    """Where-clauses: deliveries addressed to ``destination``."""
    ae_title, host, port = destination
    return db.Delivery.ae_title == ae_title, db.Delivery.host == host, db.Delivery.port == port


def _requeue_if_current(session: Session, delivery: db.Delivery, to: Destination | None = None) -> bool:
    """One conditional update: a result superseded since it was read keeps its letter dead."""
    current = select(db.SeriesResult.id).where(
        db.SeriesResult.id == delivery.result_id, db.SeriesResult.superseded.is_(False)
    )
    values = dict(state=db.QUEUED, attempts=0, last_error=None, next_attempt_at=db.utcnow())
    if to is not None:
        values.update(zip(("ae_title", "host", "port"), to))
    return bool(
        session.execute(
            update(db.Delivery)
            .where(db.Delivery.id == delivery.id, db.Delivery.state == db.DEAD, db.Delivery.result_id.in_(current))
            .values(**values)
            .execution_options(synchronize_session=False)
        ).rowcount
    )


def backoff_seconds(attempts: int, retry: RetryConfig) -> float:
    """Delay before the next try after ``attempts`` failed ones: doubling, capped."""
    return min(retry.max_delay_s, retry.first_delay_s * 2 ** max(0, attempts - 1))


Send = Callable[[Destination, list[db.Delivery]], int]  # returns how many were stored


class Batch(threading.Thread):
    """One destination's claimed deliveries, sent in a thread of their own by ``send``."""

    def __init__(self, destination: Destination, deliveries: list[db.Delivery], send: Send) -> None:
        ae_title, host, port = destination
        super().__init__(name=f"deliver to {ae_title}@{host}:{port}", daemon=True)
        self.destination = destination
        self.deliveries = deliveries
        self._send = send
        self.sent = 0  # how many were stored, once the thread has ended

    def run(self) -> None:
        self.sent = self._send(self.destination, self.deliveries)


class Dispatcher:
    def __init__(
        self, sessions: sessionmaker[Session], spool: Spool, retry: RetryConfig, *, calling_ae: str, timeout: float = 30
    ) -> None:
        self.sessions = sessions
        self.spool = spool
        self.retry = retry
        self.calling_ae = calling_ae
        self.timeout = timeout
        # Guards what follows; never held during a send.
        self._lock = threading.Lock()
        # Each destination's batch under way: a destination that does not
        # answer holds up its own reports only, and gets no second batch.
        self._batches: dict[Destination, Batch] = {}
        # Claimed deliveries whose failed try the database refused to record:
        # queued again at the next round's start, not left sending.
        self._put_back: list[int] = []
        # Deliveries the PACS stored whose success the database refused to
        # record: recorded at the next round's start, never sent again.
        self._acknowledged: list[db.Delivery] = []
        self._stopping = threading.Event()

    def stop(self) -> None:
        """Start no more batches, and end those under way after the report on
        the wire: the node is stopping (what is left is queued for its next start).
        Reports stored but not yet recorded sent are recorded now if the database answers."""
        self._stopping.set()
        with self._lock:
            try:
                self._record_acknowledged()
            except OperationalError as exc:
                logger.warning(
                    "%d reports stored by the PACS could not be recorded sent; they are sent again at the next "
                    "start: %s",
                    len(self._acknowledged),
                    db.error_text(exc),
                )

    def run_once(self, now: dt.datetime | None = None) -> int:
        """Send every due delivery and wait for it; returns how many were stored.

        A destination whose earlier batch is still under way is left for a later round.
        """
        batches = self.start_round(now)
        for batch in batches:
            batch.join()
        return sum(batch.sent for batch in batches)

    def start_round(self, now: dt.datetime | None = None) -> list[Batch]:
        """Claim the due deliveries of each destination that has no batch under way
        and start sending them, one thread per destination; returns without waiting."""
        now = now or db.utcnow()
        with self._lock:
            if not self._record_acknowledged():
                return []  # sending more while successes cannot be recorded would only add to them
            self._put_back_claims()
            started = []
            for destination, group in groupby(self._due(now), key=_destination):
                if self._stopping.is_set():
                    break
                if self._busy(destination):
                    continue
                claimed = self._claim(list(group), now)
                if claimed:
                    batch = self._batches[destination] = Batch(destination, claimed, self._send_batch)
                    batch.start()
                    started.append(batch)
            return started

    def wait(self) -> None:
        """Wait for the batches under way to end."""
        with self._lock:
            batches = list(self._batches.values())
        for batch in batches:
            batch.join()

    def _due(self, now: dt.datetime) -> list[db.Delivery]:
        with self.sessions() as session:
            return list(
                session.scalars(
                    select(db.Delivery)
                    .where(db.Delivery.state == db.QUEUED, db.Delivery.next_attempt_at <= now)
                    .order_by(db.Delivery.ae_title, db.Delivery.host, db.Delivery.port, db.Delivery.id)
                )
            )

    def _busy(self, destination: Destination) -> bool:
        batch = self._batches.get(destination)
        return batch is not None and batch.is_alive()

    def _send_batch(self, destination: Destination, claimed: list[db.Delivery]) -> int:
        try:
            return self._send_to(*destination, claimed)
        except Exception as exc:  # none may stay sending until a restart
            logger.exception("sending to %s@%s:%d failed", *destination)
            with self._lock:
                acknowledged = {d.id for d in self._acknowledged}
            for delivery in claimed:
                if delivery.id in acknowledged:  # the PACS holds it: to be recorded sent, not tried again
                    continue
                try:
                    self._failed(delivery, f"sending failed: {exc!r}")
                except Exception:
                    logger.exception("recording the failed try of %s failed too", delivery.sop_instance_uid)
                    with self._lock:
                        self._put_back.append(delivery.id)
            return 0

    def _record_acknowledged(self) -> bool:
        """Record as sent the deliveries stored by the PACS that the database failed to record;
        False if it fails again."""
        while self._acknowledged:
            try:
                self._sent(self._acknowledged[0])
            except OperationalError:
                raise  # the database fails: the node says so once, not each round
            except Exception as exc:
                logger.warning("recording %d stored reports as sent failed again: %r", len(self._acknowledged), exc)
                return False
            self._acknowledged.pop(0)
        return True

    def _put_back_claims(self) -> None:
        """Deliveries left sending by a round that could not record their failure go back to queued."""
        if not self._put_back:
            return
        try:
            with db.transaction(self.sessions) as session:
                _unclaim(session, self._put_back)
        except Exception:
            logger.exception("queueing %d claimed deliveries again failed", len(self._put_back))
            return
        self._put_back.clear()

    def _claim(self, due: list[db.Delivery], now: dt.datetime) -> list[db.Delivery]:
        """Move each delivery still due from queued to sending; returns the ones this call moved.

        Another dispatcher may have claimed, or the worker superseded, some of
        them since they were read: those are not ours to send.
        """
        with db.transaction(self.sessions) as session:
            claimed = []
            for delivery in due:
                moved = session.execute(
                    update(db.Delivery)
                    .where(
                        db.Delivery.id == delivery.id,
                        db.Delivery.state == db.QUEUED,
                        db.Delivery.next_attempt_at <= now,
                    )
                    .values(state=db.SENDING)
                ).rowcount
                if moved:
                    # Read again: another dispatcher may have tried it since (its attempts).
                    claimed.append(session.get(db.Delivery, delivery.id))
            return claimed

    def _send_to(self, ae_title: str, host: str, port: int, deliveries: list[db.Delivery]) -> int:
        datasets = {}
        for delivery in deliveries:
            try:
                datasets[delivery.id] = dcmread(self.spool.absolute(delivery.path))
            except Exception as exc:
                self._failed(delivery, f"report file unreadable: {exc}", final=True)
        if not datasets:
            return 0
        ae = client_ae(self.calling_ae, self.timeout)
        # One context per (SOP class, transfer syntax): an association allows
        # at most 128, and many reports may be due after a long outage.
        request_store_contexts(ae, ((ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets.values()))
        assoc, failure = associate(ae, ae_title, host, port)
        if failure:
            for delivery in deliveries:
                if delivery.id in datasets:
                    self._failed(delivery, failure)
            return 0
        sent = 0
        untried: list[int] = []
        try:
            for delivery in deliveries:
                ds = datasets.get(delivery.id)
                if ds is None:
                    continue
                if self._stopping.is_set():  # the node is stopping: the rest waits for its next start
                    untried.append(delivery.id)
                    continue
                if not assoc.is_established:
                    self._failed(delivery, "association lost before sending")
                    continue
                if not self._still_sending(delivery):  # a newer result superseded it since the batch began
                    continue
                try:
                    response = assoc.send_c_store(ds)
                except Exception as exc:  # e.g. the peer rejected this SOP class's context
                    self._failed(delivery, f"C-STORE not sent: {exc}")
                    continue
                status = int(response.Status) if response is not None and "Status" in response else None
                if status == 0x0000:
                    self._sent_or_keep(delivery)
                    sent += 1
                else:
                    shown = "no response" if status is None else f"0x{status:04X} ({status_category(status)})"
                    comment = response.get("ErrorComment", "") if response is not None else ""
                    self._failed(delivery, f"C-STORE answered {shown} {comment}".strip())
        finally:
            if assoc.is_established:
                assoc.release()
            if untried:
                with db.transaction(self.sessions) as session:
                    _unclaim(session, untried)
        return sent

    def _still_sending(self, delivery: db.Delivery) -> bool:
        with self.sessions() as session:
            return session.scalar(select(db.Delivery.state).where(db.Delivery.id == delivery.id)) == db.SENDING

    def _sent_or_keep(self, delivery: db.Delivery) -> None:
        """Record a Success; if the database fails, keep the delivery to record at the next round."""
        try:
            self._sent(delivery)
        except Exception:
            logger.exception(
                "%s was stored by %s but recording it failed; it is recorded at the next round, not sent again",
                delivery.sop_instance_uid,
                delivery.ae_title,
            )
            with self._lock:
                self._acknowledged.append(delivery)

    def _sent(self, delivery: db.Delivery) -> None:
        # Whatever the state now (even superseded meanwhile): the PACS holds it.
        with db.transaction(self.sessions) as session:
            session.execute(
                update(db.Delivery)
                .where(db.Delivery.id == delivery.id)
                .values(state=db.SENT, sent_at=db.utcnow(), attempts=delivery.attempts + 1, last_error=None)
            )
        logger.info(
            "delivered %s %s to %s@%s:%d",
            delivery.kind,
            delivery.sop_instance_uid,
            delivery.ae_title,
            delivery.host,
            delivery.port,
        )

    def _failed(self, delivery: db.Delivery, error: str, *, final: bool = False) -> None:
        attempts = delivery.attempts + 1
        dead = final or attempts >= self.retry.max_attempts
        next_at = db.utcnow() + dt.timedelta(seconds=backoff_seconds(attempts, self.retry))
        with db.transaction(self.sessions) as session:
            # Only a row still ours: one superseded during the attempt stays superseded.
            recorded = session.execute(
                update(db.Delivery)
                .where(db.Delivery.id == delivery.id, db.Delivery.state == db.SENDING)
                .values(
                    state=db.DEAD if dead else db.QUEUED,
                    attempts=attempts,
                    last_error=error,
                    next_attempt_at=next_at,
                )
            ).rowcount
        destination = f"{delivery.ae_title}@{delivery.host}:{delivery.port}"
        if not recorded:
            logger.info("%s to %s superseded during a failed try: %s", delivery.sop_instance_uid, destination, error)
        elif dead:
            logger.error(
                "gave up delivering %s to %s after %d attempts: %s",
                delivery.sop_instance_uid,
                destination,
                attempts,
                error,
            )
        else:
            logger.warning(
                "delivery of %s to %s failed (attempt %d): %s; next try at %s",
                delivery.sop_instance_uid,
                destination,
                attempts,
                error,
                next_at.isoformat(timespec="seconds"),
            )


def _destination(delivery: db.Delivery) -> Destination:
    return delivery.ae_title, delivery.host, delivery.port
