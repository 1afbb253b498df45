"""Retraining reads what the detector wrote (issue 12, item 4): ``RunIndex`` records each run
as a reference to the areaDetector files its documents point to (``run_*.json``, written
whole at the stop document), and ``read_scan`` reads the frames, uniqueIds, timestamps and
positions from those files, never half of a row the file plugin is still writing.  The
retraining service lists the entries beside ScanWriter's files and skips what it cannot
read.  The system tests run the real plans on the simulated beamline's areaDetector."""

import json
import logging
import os
import shutil
import threading
from pathlib import Path

import event_model
import h5py
import numpy as np
import pytest

from edgeloop.adfile import EPICS_EPOCH
from edgeloop.bluesky_plans import RunIndex
from edgeloop.config import Config, ConfigError, PositionsConfig
from edgeloop.remote.scan_index import usable_scans
from edgeloop.scanfile import list_scans, read_scan, scan_summary, write_scan

ATTRIBUTES = "/entry/instrument/NDAttributes"
SHAPE = (8, 6)


def frame_of(uid: int) -> np.ndarray:
    return np.full(SHAPE, uid, np.int32) + np.arange(SHAPE[1], dtype=np.int32)


def position_of(uid: int, technique: str):
    return (0.5 * uid, -0.25 * uid) if technique == "ptychography" else 1.5 * uid


class ADWriter:
    """A file in the layout of areaDetector's NDFileHDF5 plugin, written as the simulated
    IOC's plugin writes it: SWMR, and per frame the data row first, then one row for each
    NDAttribute series; :meth:`steps` yields after each dataset's row (flushed)."""

    def __init__(self, path: Path, technique: str, skip: tuple[str, ...] = (), names: tuple = ()):
        self.technique = technique
        # the position series' names (a beamline's attributes file may name them otherwise)
        self.names = names or PositionsConfig().of(technique)
        self.file = h5py.File(path, "w", libver="latest")
        detector = self.file.create_group("entry/instrument/detector")
        self.data = detector.create_dataset(
            "data", (0, *SHAPE), np.int32, maxshape=(None, *SHAPE), chunks=(1, *SHAPE)
        )
        self.file["entry/data/data"] = self.data
        attributes = self.file.create_group(ATTRIBUTES)
        names = {"NDArrayUniqueId": np.int32, "NDArrayTimeStamp": np.float64, "Mode": "S40"}
        names.update(dict.fromkeys(self.names, np.float64))
        self.series = {
            name: attributes.create_dataset(name, (0,), dtype, maxshape=(None,), chunks=(64,))
            for name, dtype in names.items()
            if name not in skip
        }
        self.file.swmr_mode = True
        self.n = 0

    def values(self, uid: int) -> dict:
        position = position_of(uid, self.technique)
        values = {
            "NDArrayUniqueId": uid,
            "NDArrayTimeStamp": 1000.0 + uid,  # seconds since 1990
            "Mode": b"ptycho" if self.technique == "ptychography" else b"hedm",
        }
        values.update(zip(self.names, np.atleast_1d(position)))
        return values

    def steps(self, uid: int):
        n = self.n
        for dataset, value in (
            (self.data, frame_of(uid)),
            *((self.series[k], v) for k, v in self.values(uid).items() if k in self.series),
        ):
            dataset.resize(n + 1, axis=0)
            dataset[n] = value
            self.file.flush()
            yield
        self.n = n + 1

    def append(self, *uids: int) -> "ADWriter":
        for uid in uids:
            for _ in self.steps(uid):
                pass
        return self

    def close(self) -> None:
        self.file.close()


def write_ad_file(path: Path, n: int, technique="ptychography", **kwargs) -> Path:
    ADWriter(path, technique, **kwargs).append(*range(1, n + 1)).close()
    return path


def run_docs(technique, files, scan_id=7, frame_per_point=1, pages=False):
    """The documents of a run whose detector wrote ``files`` ([(path, frames)]): one
    resource per file, one datum and one event per point."""
    md = {"scan_id": scan_id, "plan_name": "test_plan"}
    if technique:
        md["technique"] = technique
    run = event_model.compose_run(metadata=md)
    docs = [("start", run.start_doc)]
    key = {"source": "t", "dtype": "array", "shape": [1, *SHAPE], "external": "FILESTORE:"}
    descriptor = run.compose_descriptor(name="primary", data_keys={"det_image": key})
    docs.append(("descriptor", descriptor.descriptor_doc))
    seq = 0
    for path, frames in files:
        resource = run.compose_resource(
            spec="AD_HDF5",
            root="/",
            resource_path=str(Path(path).resolve()).lstrip("/"),
            resource_kwargs={"frame_per_point": frame_per_point},
        )
        docs.append(("resource", resource.resource_doc))
        datums = [
            resource.compose_datum(datum_kwargs={"point_number": i})
            for i in range(frames // frame_per_point)
        ]
        events = []
        for datum in datums:
            seq += 1
            events.append(
                descriptor.compose_event(
                    data={"det_image": datum["datum_id"]},
                    timestamps={"det_image": 0.0},
                    filled={"det_image": False},
                    seq_num=seq,
                )
            )
        if pages and datums:
            docs.append(("datum_page", event_model.pack_datum_page(*datums)))
            docs.append(("event_page", event_model.pack_event_page(*events)))
        else:
            for datum, event in zip(datums, events):
                docs += [("datum", datum), ("event", event)]
    docs.append(("stop", run.compose_stop()))
    return docs


def index_run(data_dir: Path, docs, positions: PositionsConfig | None = None) -> Path:
    index = RunIndex(data_dir, positions)
    for name, doc in docs:
        index(name, doc)
    assert not index.errors
    return index.last_path


def check_rows(scan: dict, n: int, technique="ptychography") -> None:
    """``scan`` holds the first ``n`` frames of an ADWriter file, each row whole."""
    uids = np.arange(1, n + 1)
    np.testing.assert_array_equal(scan["unique_id"], uids)
    np.testing.assert_array_equal(scan["frames"], [frame_of(u) for u in uids])
    np.testing.assert_array_equal(scan["timestamps"], 1000.0 + uids + EPICS_EPOCH)
    key = "positions_um" if technique == "ptychography" else "omega_deg"
    expected = np.array([position_of(u, technique) for u in uids], float)
    np.testing.assert_array_equal(scan[key], expected.reshape(scan[key].shape))
    assert scan["frames"].shape == (n, *SHAPE)


def test_the_entry_is_written_at_the_stop_document_only_and_whole(tmp_path, monkeypatch):
    index_dir = tmp_path / "index"
    docs = run_docs("ptychography", [(tmp_path / "a.h5", 12)], frame_per_point=2)
    index = RunIndex(index_dir)
    for name, doc in docs[:-1]:
        index(name, doc)
        assert not index_dir.exists() or not list(index_dir.iterdir()), name
    index(*docs[-1])
    start = docs[0][1]
    (path,) = index_dir.iterdir()  # no temporary file left
    assert path == index.last_path and path.name == f"run_00007_{start['uid'][:8]}.json"
    entry = json.loads(path.read_text())
    assert entry["technique"] == "ptychography"
    assert entry["start"] == start and entry["stop"]["exit_status"] == "success"
    (resource,) = entry["resources"]
    assert resource["spec"] == "AD_HDF5" and resource["resource_kwargs"] == {"frame_per_point": 2}
    assert Path(resource["root"], resource["resource_path"]) == (tmp_path / "a.h5").resolve()
    assert (resource["frames"], resource["datums"], resource["events"]) == (12, 6, 6)

    # datum and event pages count alike
    paged = run_docs("hedm", [(tmp_path / "b.h5", 5), (tmp_path / "c.h5", 3)], 8, pages=True)
    entry = json.loads(index_run(index_dir, paged).read_text())
    assert entry["technique"] == "hedm"
    assert [(r["frames"], r["datums"], r["events"]) for r in entry["resources"]] == [
        (5, 5, 5),
        (3, 3, 3),
    ]

    # a failing write leaves no entry, no temporary file, and does not stop the run
    def refuse(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    before = sorted(index_dir.iterdir())
    failing = RunIndex(index_dir)
    for name, doc in run_docs("ptychography", [(tmp_path / "d.h5", 4)], scan_id=9):
        failing(name, doc)
    assert sorted(index_dir.iterdir()) == before
    assert failing.last_path is None and "No space left" in failing.errors[0]


def test_runs_without_files_or_technique_are_not_recorded(tmp_path, caplog):
    index = RunIndex(tmp_path)
    with caplog.at_level(logging.INFO, logger="edgeloop.bluesky_plans.run_index"):
        for name, doc in run_docs("ptychography", [], scan_id=1):  # frames in the events
            index(name, doc)
        for name, doc in run_docs(None, [(tmp_path / "x.h5", 3)], scan_id=2):  # a count
            index(name, doc)
    assert list(tmp_path.iterdir()) == [] and index.last_path is None
    assert "refers to no detector files; not recorded" in caplog.text


def test_read_scan_of_an_entry_gives_what_scanwriter_files_give(tmp_path):
    first = write_ad_file(tmp_path / "first.h5", 5)
    second = write_ad_file(tmp_path / "second.h5", 4)  # as if the plugin started a new file
    with h5py.File(second, "r+") as f:  # its uniqueIds go on from the first file's
        f[f"{ATTRIBUTES}/NDArrayUniqueId"][:] = np.arange(6, 10)
        f["entry/data/data"][:] = [frame_of(u) for u in range(6, 10)]
        f[f"{ATTRIBUTES}/SampleX"][:] = [position_of(u, "ptychography")[0] for u in range(6, 10)]
        f[f"{ATTRIBUTES}/SampleY"][:] = [position_of(u, "ptychography")[1] for u in range(6, 10)]
        f[f"{ATTRIBUTES}/NDArrayTimeStamp"][:] = 1000.0 + np.arange(6, 10)
    entry = index_run(tmp_path, run_docs("ptychography", [(first, 5), (second, 4)]))
    scan = read_scan(entry)
    check_rows(scan, 9)
    start = json.loads(entry.read_text())["start"]
    assert set(scan) == {
        "frames",
        "unique_id",
        "timestamps",
        "positions_um",
        "technique",
        "start",
        "plan_name",
        "uid",
        "scan_id",
        "exit_status",
        "num_events",
        "complete",
        "reason",
        "path",
    }
    assert scan["technique"] == "ptychography" and scan["start"] == start
    assert (scan["plan_name"], scan["uid"], scan["scan_id"]) == ("test_plan", start["uid"], 7)
    assert (scan["exit_status"], scan["num_events"], scan["complete"]) == ("success", 9, True)
    assert scan["reason"] == "" and scan["path"] == entry
    assert scan_summary(entry) == ("ptychography", 9)

    longer = write_ad_file(tmp_path / "longer.h5", 8, "hedm")  # more frames than the run's
    hedm = index_run(tmp_path, run_docs("hedm", [(longer, 6)], scan_id=8))
    check_rows(read_scan(hedm), 6, "hedm")
    assert scan_summary(hedm) == ("hedm", 6)
    assert set(list_scans(tmp_path)) == {entry, hedm}


def test_globus_staging_sends_the_detectors_files_with_a_portable_entry(tmp_path):
    """Globus staging copies each scan under one folder at its path relative to the data
    directory (issue 22 item 16: two files of one name in two folders stay two): a run
    entry goes with the files it refers to, as a copy that names them relative to itself."""
    from edgeloop.remote.staging import portable, relative

    base = tmp_path / "data"
    entries, frames = [], []
    for k, folder in enumerate((base / "detector" / "a", tmp_path / "elsewhere" / "b")):
        folder.mkdir(parents=True)
        ad = write_ad_file(folder / "frames_000000.h5", 5 + k)  # one name, two folders
        frames.append(5 + k)
        entries.append(index_run(base, run_docs("ptychography", [(ad, 5 + k)], scan_id=k)))
    sent, files = portable([str(e) for e in entries], base / ".staged", base)
    dests = [relative(f, base) for f in files]
    assert len(set(dests)) == len(dests) == 4  # nothing collides
    assert "detector/a/frames_000000.h5" in dests
    assert any(d.startswith("external/") and d.endswith("b/frames_000000.h5") for d in dests)
    # what the destination holds: each file at its relative path, the entries readable there
    dest = tmp_path / "dest"
    for f, d in zip(files, dests):
        (dest / d).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest / d)
    for entry, copy, n in zip(entries, sent, frames):
        there = dest / relative(copy, base)
        check_rows(read_scan(there), n)
        assert read_scan(entry)["uid"] == read_scan(there)["uid"]


def test_a_file_being_written_is_never_read_half_written(tmp_path):
    """The writer thread stops after each dataset's row of each frame (the frames' row first,
    as the IOC writes them), and the entry is read there: only whole rows come back."""
    n = 6
    writer = ADWriter(tmp_path / "det.h5", "ptychography")
    writer.append(1)  # the plugin opens its file with the first frame
    entry = index_run(tmp_path, run_docs("ptychography", [(tmp_path / "det.h5", n)]))
    pause, failures = threading.Barrier(2, timeout=30), []

    def write():
        try:
            for uid in range(2, n + 1):
                for _ in writer.steps(uid):
                    pause.wait()  # the reader reads now
                    pause.wait()  # and is done
        except Exception as exc:
            failures.append(exc)
            pause.abort()

    thread = threading.Thread(target=write, name="ad-writer")
    thread.start()
    seen = []
    try:
        for uid in range(2, n + 1):
            for step in range(len(writer.series) + 1):
                pause.wait()
                whole = uid if step == len(writer.series) else uid - 1
                scan = read_scan(entry)
                check_rows(scan, whole)
                assert not scan["complete"] or whole == n
                assert ("holds" in scan["reason"]) == (whole < n)
                if whole < n:
                    with pytest.raises(ValueError, match=f"holds {whole} of the {n} frames"):
                        scan_summary(entry)
                seen.append(whole)
                pause.wait()
    except BaseException:
        pause.abort()  # the writer waits no more
        raise
    finally:
        thread.join(30)
        writer.close()
    assert not failures
    assert seen.count(n - 1) == len(writer.series) + 1  # the last frame, half-written, read
    scan = read_scan(entry)
    check_rows(scan, n)
    assert scan["complete"] and scan_summary(entry) == ("ptychography", n)


def test_unreadable_files_give_clear_errors_and_retraining_skips_them(tmp_path, caplog):
    data = tmp_path / "data"
    files = tmp_path / "files"
    data.mkdir()
    files.mkdir()
    good = index_run(data, run_docs("ptychography", [(write_ad_file(files / "g.h5", 6), 6)], 1))
    # a ScanWriter file, as before
    write_scan(
        data / "scan_2_writer.h5", "ptychography", np.zeros((5, *SHAPE), np.int32), scan_id=2
    )
    missing = index_run(data, run_docs("ptychography", [(files / "gone.h5", 6)], 3))
    no_y = write_ad_file(files / "no_y.h5", 6, skip=("SampleY",))
    layout = index_run(data, run_docs("ptychography", [(no_y, 6)], 4))
    truncated = shutil.copy(files / "g.h5", files / "truncated.h5")
    os.truncate(truncated, os.path.getsize(truncated) // 2)
    broken = index_run(data, run_docs("ptychography", [(truncated, 6)], 5))
    short = index_run(data, run_docs("ptychography", [(write_ad_file(files / "s.h5", 3), 6)], 6))
    not_json = data / "run_00007_deadbeef.json"
    not_json.write_text('{"technique": "ptych')

    with pytest.raises(FileNotFoundError, match=r"no areaDetector file .*gone\.h5 \(resource"):
        read_scan(missing)
    with pytest.raises(OSError, match="gone.h5"):
        scan_summary(missing)
    for check in (read_scan, scan_summary):
        with pytest.raises(ValueError, match=r"missing \['/entry/instrument/NDAttributes/SampleY"):
            check(layout)
        with pytest.raises(ValueError, match="truncated.h5 .* is not a readable HDF5 file"):
            check(broken)
        with pytest.raises(ValueError, match="not a run entry"):
            check(not_json)
    with pytest.raises(ValueError, match="holds 3 of the 6 frames"):
        scan_summary(short)
    partial = read_scan(short)  # the frames there are, marked incomplete
    check_rows(partial, 3)
    assert not partial["complete"] and "holds 3 of 6 frames" in partial["reason"]

    with caplog.at_level(logging.WARNING, logger="edgeloop.remote.service"):
        usable = usable_scans(data)
    assert sorted(usable) == sorted(
        [(str(good), "ptychography", 6), (str(data / "scan_2_writer.h5"), "ptychography", 5)]
    )
    for path in (missing, layout, broken, short, not_json):
        assert f"skipping scan {path}" in caplog.text


@pytest.mark.parametrize("technique", ["ptychography", "hedm"])
def test_positions_under_a_beamlines_own_attribute_names_are_read(tmp_path, technique):
    positions = PositionsConfig(x="StageX", y="StageY", rotation="Omega")
    names = positions.of(technique)
    path = write_ad_file(tmp_path / "own.h5", 5, technique, names=names)
    entry = index_run(tmp_path, run_docs(technique, [(path, 5)]), positions)
    assert json.loads(entry.read_text())["position_attributes"] == list(names)
    check_rows(read_scan(entry), 5, technique)

    recorded = json.loads(entry.read_text())
    del recorded["position_attributes"]  # an entry of before: areaDetector's names
    entry.write_text(json.dumps(recorded))
    with pytest.raises(ValueError, match="missing.*Sample"):
        read_scan(entry)


def test_an_attribute_name_an_attributes_file_cannot_hold_is_refused():
    with pytest.raises(ConfigError, match="positions.x"):
        Config.from_dict({"positions": {"x": "Stage X"}})
