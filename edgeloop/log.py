"""Logging (core): one handler on the ``edgeloop`` logger; the root logger is left alone.

Every module logs to ``logging.getLogger(__name__)``, which is under ``edgeloop`` because the
design card's folders are mapped into the ``edgeloop`` namespace."""

from __future__ import annotations

import logging
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# what -vv also shows: the libraries edgeloop drives
LIBRARY_LOGGERS = ("caproto", "p4p", "bluesky", "ophyd", "parsl", "globus_compute_sdk")


def verbosity_level(verbose: int = 0, quiet: int = 0) -> int:
    """-q: WARNING, none: INFO, -v: DEBUG (``-qq``: ERROR)."""
    return min(max(logging.INFO + 10 * (quiet - verbose), logging.DEBUG), logging.CRITICAL)


def config_logging(
    level: int | str = logging.INFO, stream=None, libraries: bool = False
) -> logging.Handler:
    """Send the ``edgeloop`` logger (and, with ``libraries``, those of the libraries it
    drives) to ``stream`` (default stderr) at ``level``; calling it again replaces the
    handler it added before."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.set_name("edgeloop")
    for name in ("edgeloop", *(LIBRARY_LOGGERS if libraries else ())):
        target = logging.getLogger(name)
        for old in [h for h in target.handlers if h.get_name() == "edgeloop"]:
            target.removeHandler(old)
        target.addHandler(handler)
        target.setLevel(level)
        target.propagate = False
    return handler
