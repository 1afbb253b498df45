"""Waiting on a condition, never on a fixed sleep, in one place for the apps, the parts, the
tests and the benchmarks:

- ``wait_until(predicate, timeout, what)``: the first truthy value of ``predicate()``;
- ``wait_settled(read, done, quiet_s, timeout, what)``: a reading once ``done`` holds for it
  and it has stopped changing (counters after a burst);
- ``holds_for(predicate, seconds, what)``: a condition that must keep holding for a while (the
  check that something does *not* happen: no retraining starts, no counter moves), failing
  the moment it stops holding."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str = "a condition",
    poll: float = 0.05,
    detail: Callable[[], str] = lambda: "",
    ended: threading.Event | None = None,
) -> T:
    """The first truthy value ``predicate()`` returns.  TimeoutError after ``timeout``
    seconds, naming ``what`` and ``detail()`` (e.g. the value last read, a server's log);
    RuntimeError once ``ended`` is set (what was waited on went away)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if ended is not None and ended.is_set():
            raise RuntimeError(f"ended while waiting for {what}")
        if time.monotonic() > deadline:
            extra = detail()
            raise TimeoutError(
                f"timed out after {timeout:.1f} s waiting for {what}"
                + (f": {extra}" if extra else "")
            )
        time.sleep(poll)


def wait_settled(
    read: Callable[[], T],
    done: Callable[[T], bool],
    quiet_s: float,
    timeout: float,
    what: str = "a reading to settle",
    poll: float = 0.1,
) -> T:
    """``read()`` once ``done`` holds for it and it has not changed for ``quiet_s`` seconds;
    TimeoutError (with the last reading) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = read(), time.monotonic()
    while True:
        now = time.monotonic()
        if done(last) and now - since >= quiet_s:
            return last
        if now > deadline:
            raise TimeoutError(f"timed out after {timeout:.1f} s waiting for {what}: {last!r}")
        time.sleep(poll)
        value = read()
        if value != last:
            last, since = value, time.monotonic()


def holds_for(
    predicate: Callable[[], object],
    seconds: float,
    what: str = "a condition",
    poll: float = 0.05,
    detail: Callable[[], str] = lambda: "",
) -> None:
    """Check ``predicate()`` every ``poll`` seconds for ``seconds``: AssertionError, naming
    ``what`` and ``detail()``, the first time it is falsy.  For a negative check, where the
    quiet period is the claim itself (e.g. "three policy polls start nothing")."""
    deadline = time.monotonic() + seconds
    while True:
        if not predicate():
            extra = detail()
            raise AssertionError(f"{what} stopped holding" + (f": {extra}" if extra else ""))
        if time.monotonic() >= deadline:
            return
        time.sleep(poll)
