"""Runs stored in Tiled (issue 23, item 3): TiledWriter behind FileAttributes records a run's
frames and, beside them, their uniqueIds, time stamps and positions from the detector's
files; TiledRuns finds the runs a retraining can use with one small query per poll; and
read_scan reads a run through the server as it reads a run entry from the files.  The real
server (``edgeloop tiled``: a SimpleTiledServer on loopback), the documents of ophyd v1
(resource/datum) and of ophyd-async (stream_resource/stream_datum)."""

import logging
import os
from pathlib import Path

import event_model
import numpy as np
import pytest

from edgeloop import tiled_runs
from edgeloop.app.processes import ManagedProcess
from edgeloop.app.tiled_server import wait_ready
from edgeloop.bluesky_plans import tiled_writer
from edgeloop.config import Config, PositionsConfig
from edgeloop.registry import Registry
from edgeloop.remote.scan_index import MIN_FRAMES, TiledScans
from edgeloop.scanfile import read_scan
from tests.kit.env import TEST_ENV, free_port
from tests.kit.runs import run_engine, run_plan
from tests.kit.servers import whole_system
from tests.unit.test_run_index import SHAPE, check_rows, run_docs, write_ad_file

pytest.importorskip("tiled.server")


def embedded(tmp: Path):
    """A configuration whose [tiled] is an embedded server (under its data directory), and
    that server, started."""
    cfg = Config(data_dir=str(tmp / "data"))
    cfg.tiled.port = free_port()
    cfg.dump(tmp / "config.json")
    server = Embedded(cfg, tmp)
    server.start()
    return server


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """One server for the module; its key in the environment, as the service puts it."""
    server = embedded(tmp_path_factory.mktemp("tiled"))
    os.environ["TILED_API_KEY"] = tiled_runs.api_key(server.cfg.tiled, server.cfg.data_path)
    try:
        yield server
    finally:
        os.environ.pop("TILED_API_KEY", None)
        server.stop()


@pytest.fixture
def catalog(tiled, request):
    """A container of this test's own on the server, where its runs go."""
    return tiled.client().create_container(key=request.node.name.replace("[", "_")[:60])


class Embedded:
    """``edgeloop tiled`` on the test's configuration, a process of its own."""

    def __init__(self, cfg: Config, tmp: Path):
        self.cfg, self.tmp, self.proc = cfg, tmp, None

    def start(self):
        args = ["tiled", "--prefix", "T:", "--config", str(self.tmp / "config.json")]
        self.proc = ManagedProcess("tiled", args, self.tmp / "tiled.log", env=TEST_ENV)
        wait_ready(self.cfg, 120, self.proc)

    def stop(self):
        if self.proc is not None:
            assert self.proc.stop() is not None
            self.proc = None

    def client(self):
        return tiled_runs.connect(self.cfg.tiled, self.cfg.data_path)


def v1_docs(path: Path, n: int, technique="ptychography", **kwargs):
    """An ophyd v1 areaDetector run (resource/datum, one event per point), with the image's
    numpy dtype as ophyd's DetectorBase describes it."""
    docs = run_docs(technique, [(path, n)], **kwargs)
    for name, doc in docs:
        if name == "descriptor":
            key = doc["data_keys"]["det_image"]
            key.update(dtype_numpy="<i4", shape=[kwargs.get("frame_per_point", 1), *SHAPE])
    return docs


def stream_docs(path: Path, n: int, technique="ptychography"):
    """An ophyd-async run: the image by stream_resource/stream_datum (one per point), a
    motor's readback in the events."""
    run = event_model.compose_run(metadata={"technique": technique, "scan_id": 3})
    keys = {
        "det": {
            "source": "ca://T:det:HDF1:FullFileName_RBV",
            "dtype": "array",
            "dtype_numpy": "<i4",
            "shape": list(SHAPE),
            "external": "STREAM:",
        },
        "stage_x": {"source": "ca://T:x.RBV", "dtype": "number", "shape": []},
    }
    descriptor = run.compose_descriptor(name="primary", data_keys=keys)
    resource = run.compose_stream_resource(
        mimetype="application/x-hdf5",
        uri=f"file://localhost{Path(path).resolve()}",
        data_key="det",
        parameters={"dataset": "/entry/data/data", "chunk_shape": [1, *SHAPE]},
    )
    docs = [("start", run.start_doc), ("descriptor", descriptor.descriptor_doc)]
    docs.append(("stream_resource", resource.stream_resource_doc))
    for i in range(n):
        datum = resource.compose_stream_datum(
            indices={"start": i, "stop": i + 1},
            seq_nums={"start": i + 1, "stop": i + 2},
            descriptor=descriptor.descriptor_doc,
        )
        docs.append(("stream_datum", datum))
        docs.append(
            (
                "event",
                descriptor.compose_event(
                    data={"stage_x": 0.5 * i}, timestamps={"stage_x": 0.0}, seq_num=i + 1
                ),
            )
        )
    docs.append(("stop", run.compose_stop()))
    return docs


def record(catalog, docs, positions=None):
    writer = tiled_writer(catalog, positions)
    for name, doc in docs:
        writer(name, doc)
    return writer.last_path


@pytest.mark.parametrize("per_point", [1, 2])
def test_a_v1_run_is_read_through_tiled_as_its_files_hold_it(tiled, catalog, per_point):
    path = write_ad_file(tiled.cfg.data_path / f"a{per_point}.h5", 12)
    ref = record(catalog, v1_docs(path, 12, frame_per_point=per_point))
    assert tiled_runs.is_ref(ref) and ref.startswith("http://127.0.0.1:")
    check_rows(read_scan(ref), 12)
    found = tiled_runs.TiledRuns(catalog).usable()
    assert found == [(ref, "ptychography", 12)]
    # what any Tiled user sees: the frames and their series as arrays of the run
    stream = catalog[ref.rsplit("/", 1)[1]]["primary"]
    assert {"det_image", "det_image_unique_id", "det_image_x", "det_image_y"} <= set(stream)


def test_a_file_with_more_frames_than_the_run_is_read_to_the_runs_frames(tiled, catalog):
    """The detector ran on after the run stopped (an aborted fly scan): 12 rows, 8 datums."""
    path = write_ad_file(tiled.cfg.data_path / "more.h5", 12)
    check_rows(read_scan(record(catalog, v1_docs(path, 8))), 8)


@pytest.mark.parametrize("technique", ["ptychography", "hedm"])
def test_an_ophyd_async_run_is_read_through_tiled(tiled, catalog, technique):
    path = write_ad_file(tiled.cfg.data_path / f"b_{technique}.h5", 10, technique)
    ref = record(catalog, stream_docs(path, 10, technique))
    check_rows(read_scan(ref), 10, technique)
    scan = read_scan(ref)
    assert scan["technique"] == technique and scan["scan_id"] == 3 and scan["complete"]


def test_positions_under_a_beamlines_own_names(tiled, catalog):
    names = PositionsConfig(x="StageX", y="StageY")
    path = write_ad_file(tiled.cfg.data_path / "c.h5", 6, names=("StageX", "StageY"))
    check_rows(read_scan(record(catalog, v1_docs(path, 6), names)), 6)


def test_runs_are_found_newest_first_with_one_query_per_poll(tiled, catalog):
    runs = tiled_runs.TiledRuns(catalog)
    first = record(catalog, v1_docs(write_ad_file(tiled.cfg.data_path / "1.h5", 8), 8))
    docs = v1_docs(write_ad_file(tiled.cfg.data_path / "2.h5", 6, "hedm"), 6, "hedm")
    writer = tiled_writer(catalog)
    for name, doc in docs[:-1]:  # the second run has not stopped yet
        writer(name, doc)
    assert runs.usable() == [(first, "ptychography", 8)]
    reads = runs.reads
    assert runs.usable() == [(first, "ptychography", 8)]
    assert runs.reads == reads + 1  # the running one looked at again; the finished one not
    writer(*docs[-1])
    assert runs.usable() == [(writer.last_path, "hedm", 6), (first, "ptychography", 8)]
    few = record(catalog, v1_docs(write_ad_file(tiled.cfg.data_path / "3.h5", 3), 3))
    assert (few, "ptychography", 3) in runs.usable()
    assert few not in [r for r, *_ in runs.usable(MIN_FRAMES)]  # too few to train on


def test_a_run_without_its_files_series_is_skipped_with_a_reason(tiled, catalog, caplog):
    from bluesky_tiled_plugins import TiledWriter

    path = write_ad_file(tiled.cfg.data_path / "d.h5", 8)
    plain = TiledWriter(catalog)  # not through FileAttributes: no series beside the frames
    for name, doc in v1_docs(path, 8):
        plain(name, doc)
    with caplog.at_level(logging.WARNING):
        assert tiled_runs.TiledRuns(catalog).usable() == []
    assert "was the run recorded through FileAttributes" in caplog.text


def test_runs_survive_a_restart_and_an_outage_loses_none(tmp_path, caplog, monkeypatch):
    """The service's view (TiledScans: the server's root, as configured), on a server of
    the test's own."""
    server = embedded(tmp_path)
    monkeypatch.setenv("TILED_API_KEY", tiled_runs.api_key(server.cfg.tiled, server.cfg.data_path))
    try:
        path = write_ad_file(server.cfg.data_path / "e.h5", 9)
        ref = record(server.client(), v1_docs(path, 9))
        scans = TiledScans(server.cfg)
        assert scans.usable() == [(ref, "ptychography", 9)]
        server.stop()
        with caplog.at_level(logging.WARNING):
            assert scans.usable() == [(ref, "ptychography", 9)]  # what it found before
        assert "does not answer" in caplog.text
        server.start()  # the same directory and port: the same catalog
        check_rows(read_scan(ref), 9)
        assert TiledScans(server.cfg).usable() == [(ref, "ptychography", 9)]
    finally:
        server.stop()


def test_the_embedded_servers_key_is_made_once_and_kept_private(tiled, catalog):
    key_file = tiled_runs.server_dir(tiled.cfg.data_path) / tiled_runs.KEY_FILE
    assert os.stat(key_file).st_mode & 0o077 == 0
    assert tiled_runs.api_key(tiled.cfg.tiled, tiled.cfg.data_path, create=True) == (
        key_file.read_text().strip()
    )
    from tiled.client import from_uri

    with pytest.raises(Exception, match="401|[Uu]nauthori[sz]ed|API key"):
        from_uri(tiled_runs.server_uri(tiled.cfg.tiled), api_key="not-the-key")
    assert len(catalog) == 0


@pytest.fixture
def loop(tmp_path, request):
    """A whole loop whose runs live in an embedded Tiled server, as the demo's do (the
    test's own: it restarts the server)."""
    with whole_system(tmp_path, "t", request, "second_beamline", tiled=True) as sys_:
        yield sys_


def test_a_scan_stored_in_tiled_is_retrained_from_after_the_server_restarts(loop, monkeypatch):
    """Item 3's test: a fly scan recorded by TiledWriter, the server restarted, and the
    retraining finds the run by querying Tiled and reads its frames through it; the process
    that recorded it reads it back by its reference with the key connect() found."""
    from edgeloop.app.loop import retrain_via_pv
    from edgeloop.bluesky_plans import make_devices, ptycho_fly_scan

    cfg = loop.cfg
    det, stage = make_devices(loop.prefix, cfg.data_path / "detector", timeout=15)
    store = tiled_writer(tiled_runs.connect(cfg.tiled, cfg.data_path), cfg.positions)
    before = loop.counts()
    try:
        with run_engine() as RE:
            RE.subscribe(store)
            run_plan(ptycho_fly_scan(det, stage, num=40, step=0.05, rate_hz=100), engine=RE)
    finally:
        det.destroy()
        stage.destroy()
    taken = lambda c: c["FramesIn"] + c["Repeats"]  # noqa: E731
    after = loop.settled(lambda c: taken(c) >= taken(before) + 40 and not c["InFlight"])
    assert after["FramesIn"] == after["FramesOut"] + after["Dropped"] + after["BadFrames"], (
        before,
        after,
    )
    assert not any(p.suffix == ".json" for p in cfg.data_path.iterdir())  # no run entries

    loop.procs["tiled"].stop()
    loop.start_tiled()  # the same catalog, a new process
    # whatever key the environment holds, a run is read with its own server's
    monkeypatch.setenv("TILED_API_KEY", "another-servers-key")
    scan = read_scan(store.last_path)
    assert scan["frames"].shape[0] == 40 and scan["complete"]
    np.testing.assert_array_equal(scan["unique_id"], np.arange(1, 41))

    version = int(loop.value("edge:ModelVersion"))
    _, states = retrain_via_pv(loop.ctx, loop.prefix, version, protocol="pva")
    new = int(loop.value("edge:ModelVersion"))
    assert "Training" in states and new > version
    assert Registry(cfg.registry_path).meta(new)["trained_on"] == [store.last_path]
    log = loop.procs["retrain-service"].output()
    assert f"staging scans from Tiled at {tiled_runs.server_uri(cfg.tiled)}" in log
