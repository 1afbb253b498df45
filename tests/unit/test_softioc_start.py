"""Waiting for the ML IOC to start is bounded (issue 22 item 19): an IOC that hangs in the
middle of a line, or exits, ends the wait with its output; one that says it is ready is
returned at once (the IOC itself runs in tests/system/test_ml_ioc.py)."""

import subprocess
import time

import pytest

from edgeloop.ioc.softioc import READY, wait_ready


def _shell(script: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_an_ioc_that_hangs_mid_line_is_killed_at_the_deadline():
    proc = _shell("echo loading; printf 'dbLoadRecords(...'; exec sleep 600")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"did not start within 1 s:\nloading\ndbLoadRecords"):
        wait_ready(proc, 1.0)
    assert time.monotonic() - t0 < 10 and proc.poll() is not None


def test_an_ioc_that_exits_is_reported_with_its_output():
    proc = _shell("echo 'Error: no such file db/ml.db'; exit 1")
    with pytest.raises(RuntimeError, match="no such file db/ml.db"):
        wait_ready(proc, 30.0)


def test_an_ioc_that_says_it_is_ready_is_returned():
    proc = _shell(f"echo starting; echo '{READY}'; exec sleep 600")
    try:
        assert wait_ready(proc, 30.0) is proc and proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
