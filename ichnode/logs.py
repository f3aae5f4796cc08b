"""The node's log: one format for every process of a node, the libraries'
chatter kept out, and warnings about real-world data that are by design.

Set up by ``ichnode serve``/``demo`` (:func:`setup_logging`), a node's extra
receiver processes (the same), its helper processes and ``ichnode send``
(:func:`quiet_source_data_warnings`): spawned processes start without it.
"""

from __future__ import annotations

import logging
import re
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
    # A peer that refuses or does not answer: logged by the node with the
    # peer and what happens next, where pynetdicom's ERROR lines name neither.
    for unnamed in ("pynetdicom.transport", "pynetdicom.acse"):
        logging.getLogger(unnamed).setLevel(logging.CRITICAL)


# Real-world UIDs such as "ID_1f6d1e8aeb" (RSNA), or with leading zeros from
# older modalities, are accepted by design. pydicom would warn of each one
# (a warning and a log record) and pynetdicom log each one it sends or
# receives: a dozen lines per image that hide the warnings that matter.
_UID_NOISE = {
    "pydicom": re.compile(
        r"Invalid value for VR UI|The value length \(\d+\) exceeds the maximum length of 64 allowed for VR UI"
    ),
    "pynetdicom.utils": re.compile("Non-conformant '"),
}


class _UidNoiseToDebug(logging.Filter):
    """Those records at DEBUG, where they can still be looked at."""

    def filter(self, record: logging.LogRecord) -> bool:
        noise = _UID_NOISE.get(record.name)
        if noise is None or record.levelno != logging.WARNING or not noise.match(record.getMessage()):
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
    warnings.filterwarnings("ignore", message=_UID_NOISE["pydicom"].pattern)
    warnings.filterwarnings("ignore", message="The string .* is unlikely to represent the intended person name")
