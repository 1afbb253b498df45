"""Scan data is never lost or half-written: ScanWriter streams each run to disk, survives a
full disk and a killed process, and retraining skips what is not a whole scan; the demo never
deletes what it did not write."""

import contextlib
import logging
import os
import shutil
import subprocess
import time

import numpy as np
import pytest

from edgeloop.app.loop import DEMO_MARKER, prepare
from edgeloop.bluesky_plans import ScanWriter, ptycho_scan
from edgeloop.config import LOOPBACK_ENV, Config
from edgeloop.remote.scan_index import ScanIndex, usable_scans
from edgeloop.scanfile import PART, read_scan, write_scan
from tests.kit.scans import check_partial, sim_devices


def test_demo_never_deletes_what_it_did_not_write(tmp_path, monkeypatch):
    for key in LOOPBACK_ENV:  # prepare() pins these for the demo: give them back afterwards
        monkeypatch.setenv(key, os.environ.get(key, ""))
    users = tmp_path / "users"
    (users / "data").mkdir(parents=True)
    (users / "notes.txt").write_text("mine")
    (users / "data" / "scan_1_mine.h5").write_text("mine too")
    with pytest.raises(FileExistsError, match="not empty"):
        prepare(Config(), users, None)
    assert (users / "notes.txt").read_text() == "mine"
    assert (users / "data" / "scan_1_mine.h5").read_text() == "mine too"

    demo = tmp_path / "demo"
    prepare(Config(), demo, None)  # a new folder: the demo's
    assert (demo / DEMO_MARKER).is_file()
    (demo / "data").mkdir()
    (demo / "data" / "scan_1_old.h5").write_text("an earlier demo's")
    (demo / "notes.txt").write_text("a user's, beside the demo's output")
    prepare(Config(), demo, None)  # the earlier demo's data goes, nothing else
    assert not (demo / "data").exists()
    assert (demo / "notes.txt").read_text() == "a user's, beside the demo's output"


def test_scan_file_grows_while_the_scan_runs(RE, tmp_path):
    det, stage = sim_devices()
    writer = ScanWriter(tmp_path)
    seen = []

    def look(name, doc):  # after the writer: its file on disk already holds this event
        if name == "event":
            part = next(tmp_path.glob(f"scan_*.h5{PART}"))
            seen.append(read_scan(part)["num_events"])

    RE.subscribe(writer)
    RE.subscribe(look)
    RE(ptycho_scan(det, stage, num=5, step=0.1))
    assert seen == [1, 2, 3, 4, 5]
    scan = read_scan(writer.last_path)
    assert scan["complete"] and scan["num_events"] == 5 and scan["frames"].shape == (5, 8, 6)
    assert not list(tmp_path.glob(f"*{PART}")) and not writer.errors


@contextlib.contextmanager
def small_disk(path, size="200k"):
    """A tmpfs of ``size`` at ``path`` (root only): a disk that really fills."""
    path.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_full_disk_keeps_the_frames_written_and_the_scan_goes_on(RE, tmp_path, caplog):
    det, stage = sim_devices((64, 64))  # 8 kB a frame: 1 MB fill up after about 90
    with small_disk(tmp_path / "disk", "1m") as disk:
        writer = ScanWriter(disk)
        RE.subscribe(writer)
        with caplog.at_level(logging.ERROR):
            RE(ptycho_scan(det, stage, num=150, step=0.05))  # does not raise
        assert len(writer.errors) == 1 and "disk full" in caplog.text
        (part,) = disk.glob("scan_*")
        assert part.name.endswith(PART)
        check_partial(part, lambda n: 20 < n < 150, (64, 64))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert usable_scans(disk) == []


def _scan_file(path, frames=5, positions=5, complete=None):
    """A small scan file; ``complete`` None: one of before the attribute."""
    data = np.zeros((frames, 4, 4), np.uint16)
    write_scan(path, "ptychography", data, np.zeros((positions, 2)), complete=complete)


def test_retraining_skips_inconsistent_scans_with_a_warning(tmp_path, caplog):
    _scan_file(tmp_path / "scan_1_good.h5")  # a file of before the `complete` attribute
    _scan_file(tmp_path / "scan_2_mismatch.h5", positions=4)
    _scan_file(tmp_path / "scan_3_incomplete.h5", complete=False)
    shutil.copy(tmp_path / "scan_1_good.h5", tmp_path / "scan_4_truncated.h5")
    with open(tmp_path / "scan_4_truncated.h5", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "scan_1_good.h5") // 2)
    with caplog.at_level(logging.WARNING):
        usable = usable_scans(tmp_path)
    assert [os.path.basename(p) for p, _, _ in usable] == ["scan_1_good.h5"]
    for name in ("scan_2_mismatch.h5", "scan_3_incomplete.h5", "scan_4_truncated.h5"):
        assert f"skipping scan {tmp_path / name}" in caplog.text


def test_the_policy_reads_each_scan_once_and_says_once_why_one_is_unusable(tmp_path, caplog):
    """Issue 22 item 12: polled every 2 s over a beamtime, the index reads a scan file again
    only when it changes, and an unusable one at most every retry_s, warning once."""
    good = tmp_path / "scan_1_aaaa.h5"
    write_scan(good, "ptychography", np.zeros((6, 8, 8), np.uint16))
    bad = tmp_path / "scan_2_bbbb.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    index = ScanIndex(retry_s=3600)
    caplog.set_level(logging.WARNING)
    for _ in range(50):
        assert index.usable(tmp_path) == [(str(good), "ptychography", 6)]
    assert index.reads == 2
    assert caplog.text.count(f"skipping scan {bad}") == 1
    write_scan(good, "ptychography", np.zeros((8, 8, 8), np.uint16))  # rewritten: read again
    os.utime(good, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert index.usable(tmp_path)[0] == (str(good), "ptychography", 8) and index.reads == 3
    index.retry_s = 0.0  # the unusable one is tried again after retry_s, still said once
    index.usable(tmp_path)
    assert index.reads == 4 and caplog.text.count(f"skipping scan {bad}") == 1
