"""Scan data is never lost or half-written: ScanWriter streams each run to disk, survives a
full disk and a killed process, and retraining skips what is not a whole scan; the demo never
deletes what it did not write."""

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

from edgeloop.app.loop import DEMO_MARKER, prepare
from edgeloop.bluesky_plans import ScanWriter, ptycho_scan
from edgeloop.config import LOOPBACK_ENV, Config
from edgeloop.remote.service import usable_scans
from edgeloop.scanfile import PART, list_scans, read_scan

SIM_DEVICES = """
import numpy as np
from ophyd import Component as Cpt, Device
from ophyd.sim import SynAxis, SynSignal

class ImageDet(Device):
    image = Cpt(SynSignal, func=lambda: np.random.poisson(5, SHAPE).astype(np.uint16),
                kind="hinted")

    def trigger(self):
        return self.image.trigger()

class SimStage(Device):
    x = Cpt(SynAxis)
    y = Cpt(SynAxis)

det, stage = ImageDet(name="cam"), SimStage(name="stage")
"""


def sim_devices(shape=(8, 6)):
    namespace = {"SHAPE": shape}
    exec(SIM_DEVICES, namespace)
    return namespace["det"], namespace["stage"]


# ------------------------------------------------------------------------------ the demo


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


# ------------------------------------------------------------------------------ streaming


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
        _check_partial(part, lambda n: 20 < n < 150, (64, 64))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert usable_scans(disk) == []


def _check_partial(path, frames_ok, shape) -> None:
    scan = read_scan(path)
    n = scan["num_events"]
    assert not scan["complete"] and frames_ok(n), n
    assert scan["frames"].shape == (n, *shape) and scan["positions_um"].shape == (n, 2)
    assert len(scan["unique_id"]) == len(scan["timestamps"]) == n
    np.testing.assert_array_equal(scan["unique_id"], np.arange(1, n + 1))


WRITER = (
    SIM_DEVICES
    + """
import resource, signal, sys, time
from bluesky import RunEngine
from edgeloop.bluesky_plans import ScanWriter, ptycho_scan

writer = ScanWriter(sys.argv[1])
RE = RunEngine({})
RE.subscribe(writer)

def hang_after_ten(name, doc):
    if name == "event" and doc["seq_num"] == 10 and sys.argv[2] == "hang":
        print("ten events", flush=True)
        time.sleep(120)

RE.subscribe(hang_after_ten)
if sys.argv[2] == "limit":  # any write error, not only a full disk: files of 300 kB at most
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
RE(ptycho_scan(det, stage, num=50, step=0.05))
print("errors:", len(writer.errors), flush=True)
"""
)


def _writer(tmp_path, how: str, shape) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    script.write_text(WRITER.replace("SHAPE", repr(shape)))
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "data"), how],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_a_write_error_keeps_the_frames_written_and_the_process_lives(tmp_path):
    proc = _writer(tmp_path, "limit", (64, 64))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "errors: 1" in out
    (part,) = (tmp_path / "data").glob("scan_*")
    assert part.name.endswith(PART)
    _check_partial(part, lambda n: 10 < n < 50, (64, 64))


def test_a_killed_writer_leaves_a_readable_partial_file(tmp_path):
    proc = _writer(tmp_path, "hang", (8, 6))
    try:
        assert proc.stdout.readline().strip() == "ten events"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    data = tmp_path / "data"
    (part,) = data.glob(f"scan_*.h5{PART}")
    _check_partial(part, lambda n: n == 10, (8, 6))
    assert list_scans(data) == [] and usable_scans(data) == []


def _scan_file(path, frames=5, positions=5, **extra):
    with h5py.File(path, "w") as f:
        f["frames"] = np.zeros((frames, 4, 4), np.uint16)
        f["positions_um"] = np.zeros((positions, 2))
        f["unique_id"] = np.arange(frames)
        f["timestamps"] = np.zeros(frames)
        f.attrs.update(
            technique="ptychography",
            start_json="{}",
            plan_name="p",
            uid="u",
            scan_id=1,
            exit_status="success",
            num_events=frames,
            **extra,
        )


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
