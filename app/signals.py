"""SIGINT and SIGTERM stop every edgeloop command the same way (app layer).

Both raise in the main thread (``KeyboardInterrupt``, or its subclass :class:`Terminated` for
SIGTERM), so every ``except KeyboardInterrupt`` / ``finally`` that stops servers and child
processes runs for both; the command then exits with 128 + the signal number (130, 143).
A second signal while the command is stopping is ignored, so an impatient Ctrl-C cannot cut
the clean-up short and leave children behind; a third ends the process at once.

A RunEngine pauses on Ctrl-C by default and waits for the user; :class:`AbortOnSignal`,
given as ``RunEngine(context_managers=[AbortOnSignal])``, aborts the run instead (its
clean-up runs and its stop document says ``abort``) and then raises as above.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)
received: int | None = None  # the first signal that asked this process to stop
_repeats = 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt."""


def _interrupt(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _on_signal(signum, frame) -> None:
    global received, _repeats
    if received is None:
        received = signum
        raise _interrupt(signum)
    _repeats += 1
    if _repeats >= 2:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    log.warning("%s: already stopping (once more to end at once)", signal.Signals(signum).name)


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT and SIGTERM raise in the main thread (enter from the main thread)."""
    global received, _repeats
    received, _repeats = None, 0
    old = {sig: signal.signal(sig, _on_signal) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def note(signum: int | None) -> None:
    """A server that handled a stop signal itself (its own event loop) reports it here."""
    global received
    if received is None and signum is not None:
        received = signum


def exit_code() -> int | None:
    """128 + the signal that stopped this process, or None."""
    return None if received is None else 128 + received


class AbortOnSignal:
    """RunEngine context manager: SIGINT or SIGTERM during a plan aborts the run at once,
    then raises ``KeyboardInterrupt`` (``Terminated`` for SIGTERM) from the ``RE(...)`` call."""

    def __init__(self, RE):
        self.RE = RE
        self.signum: int | None = None
        self._old: dict = {}
        self._aborter: threading.Thread | None = None

    def __enter__(self):
        self.signum, self._aborter = None, None
        if threading.current_thread() is threading.main_thread():
            self._old = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}
        return self

    def _on_signal(self, signum, frame) -> None:
        if self.signum is not None or received is not None:
            return
        self.signum = signum
        # RE.abort() waits for the RunEngine's loop: not in a signal handler
        self._aborter = threading.Thread(target=self._abort, name="abort-on-signal")
        self._aborter.start()

    def _abort(self) -> None:
        name = signal.Signals(self.signum).name
        log.warning("%s: aborting the run", name)
        try:
            self.RE.abort(f"interrupted by {name}")
        except Exception as exc:  # e.g. the run had just ended
            log.info("abort on %s: %s", name, exc)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}
        if self._aborter is not None:
            self._aborter.join(30)
        if self.signum is not None:
            global received
            received = received or self.signum
            raise _interrupt(self.signum)
