"""Scan data survives the writer's process: a write error (a file-size limit) keeps the frames
written and the process lives; a killed writer leaves a readable partial file that retraining
skips."""

import signal
import subprocess
import sys

from edgeloop.remote.scan_index import usable_scans
from edgeloop.scanfile import PART, list_scans
from tests.kit.scans import SIM_DEVICES, check_partial

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
    check_partial(part, lambda n: 10 < n < 50, (64, 64))


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
    check_partial(part, lambda n: n == 10, (8, 6))
    assert list_scans(data) == [] and usable_scans(data) == []
