"""The node's log: one format for every process of a node, the libraries'
chatter kept out, and warnings about real-world data that are by design.

Set up by ``ichnode serve``/``demo`` (:func:`setup_logging`), a node's extra
receiver processes (the same), its helper processes and ``ichnode send``
(:func:`quiet_source_data_warnings`): spawned processes start without it.
"""

from __future__ import annotations

import logging
import sys
import warnings


def setup_logging(level: str, process: str = "") -> None:
    """The log of ``serve`` and ``demo``, and of a node's extra receiver processes
    (``process``, e.g. "receiver-1", names them in each line)."""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s {process + ' ' if process else ''}%(name)s: %(message)s",
        stream=sys.stderr,
    )
    # These log every PDU / every copied module at INFO; their warnings are what matter here.
    for noisy in ("pynetdicom", "highdicom", "apscheduler"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    quiet_source_data_warnings()
    logging.captureWarnings(True)  # other warnings go to the log
    # A job still running at its next tick is skipped by design, not a problem.
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)


# Real-world UIDs such as "ID_1f6d1e8aeb" (RSNA), or with leading zeros from
# older modalities, are accepted by design. pydicom would warn of each one
# (a warning and a log record) and pynetdicom log each one it sends or
# receives: a dozen lines per image that hide the warnings that matter.
_UID_NOISE = {"pydicom": "Invalid value for VR UI", "pynetdicom.utils": "Non-conformant '"}


class _UidNoiseToDebug(logging.Filter):
    """Those records at DEBUG, where they can still be looked at."""

    def filter(self, record: logging.LogRecord) -> bool:
        prefix = _UID_NOISE.get(record.name)
        if prefix is None or record.levelno != logging.WARNING or not record.getMessage().startswith(prefix):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_UID_NOISE_FILTER = _UidNoiseToDebug()


def quiet_source_data_warnings() -> None:
    """Keep what real-world data holds by design out of the log and stderr:
    non-conformant UIDs, and highdicom's warning of a person name of one
    component ("ANONYMOUS", "REMOVED" in de-identified data), which the
    reports copy as they are: nothing anyone could act on, and the name
    itself in the log."""
    for name in _UID_NOISE:
        logging.getLogger(name).addFilter(_UID_NOISE_FILTER)
    warnings.filterwarnings("ignore", message="Invalid value for VR UI")
    warnings.filterwarnings("ignore", message="The string .* is unlikely to represent the intended person name")
