"""The simulated detector against the real one: the real simDetector IOC of
``../shared/adsim`` (ADSimDetector on ADCore) serves every record of the committed ADCore
table with the table's type, count and enum strings, and the simulation serves each of them
the same way."""

import json

import numpy as np
import pytest

from edgeloop.ioc.adcore_db import load_table
from edgeloop.waiting import wait_until
from tests.kit.areadetector import beamline_ioc, read_back
from tests.kit.env import DEADLINE_SLACK, TEST_ENV, ca_port, random_prefix
from tests.kit.real_ad import real_sim_detector, served_records
from tests.kit.runs import filed_frames, of, run_engine, run_plan
from tests.kit.servers import System, small_config


def expected(prefix: str) -> dict[str, dict]:
    """The table's view of each record, as served_records reports it."""
    want = {}
    for plugin, records in load_table().items():
        for name, view in records.items():
            kind = view["type"]
            row = {"type": kind, "count": view["count"]}
            if kind == "ENUM":
                row["enum_strings"] = view["enum_strings"]
            want[f"{prefix}{plugin}{name}"] = row
    return want


def differences(want: dict, seen: dict) -> list[str]:
    return [
        f"{name}: {seen.get(name, 'not served')} != {view}"
        for name, view in want.items()
        if seen.get(name) != view
    ]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    with real_sim_detector(tmp_path_factory.mktemp("real"), random_prefix("r") + "det:") as ioc:
        yield ioc


def test_the_real_ioc_serves_the_committed_table(real):
    want = expected(real.prefix)
    assert differences(want, served_records(list(want))) == []


def test_the_simulation_serves_each_record_as_the_real_ioc_does(real, tmp_path, request):
    real_view = served_records(list(expected(real.prefix)))
    with beamline_ioc(tmp_path, ca_port("area_detector_own"), request) as sim:
        sim_prefix = f"{sim.prefix}det:"
        want = {name.replace(real.prefix, sim_prefix, 1): v for name, v in real_view.items()}
        assert differences(want, served_records(list(want))) == []


def acquire(prefix: str, frames: int, period_s: float = 0.05) -> int:
    """Take ``frames`` (none: only read) on the real camera (ImageMode Multiple, put with
    completion); its ArrayCounter after them. (``repeater=False`` in every caproto call
    here: else caproto spawns a CA repeater where none is bound yet, a process that
    outlives the test.)"""
    from caproto.sync.client import read, write

    settings = {"ImageMode": 1, "NumImages": frames, "AcquireTime": 0.001}
    settings.update(AcquirePeriod=period_s, ArrayCallbacks=1)
    for name, value in settings.items() if frames else ():
        write(f"{prefix}cam1:{name}", value, notify=True, timeout=5, repeater=False)
    if frames:
        write(
            f"{prefix}cam1:Acquire", 1, notify=True, timeout=frames * period_s + 30, repeater=False
        )
    return int(read(f"{prefix}cam1:ArrayCounter_RBV", timeout=5, repeater=False).data[0])


@pytest.mark.parametrize("compressor", ["", "LZ4", "BSLZ4", "Blosc"])
def test_the_edge_answers_every_frame_of_the_real_ioc(real, tmp_path, compressor):
    """The edge on the real NDPluginPva's NTNDArrays: raw (Pva1:Image), or compressed by the
    real NDPluginCodec (Pva2:Image); every frame answered, none refused."""
    from caproto.sync.client import write

    image = "Pva2:Image" if compressor else "Pva1:Image"
    if compressor:
        write(
            f"{real.prefix}Codec1:Compressor", compressor, notify=True, timeout=5, repeater=False
        )
    cfg, path = small_config(tmp_path, random_prefix("e"))
    pva = {"EPICS_PVA_ADDR_LIST": f"{TEST_ENV['EPICS_PVA_ADDR_LIST']} {real.pva_address}"}
    edge = System(cfg, path, tmp_path / "logs", env=pva)
    try:
        edge.start("edge", "--input-pv", f"{real.prefix}{image}", ready_pv="edge:ModelVersion")
        # until the edge's monitor is live, a frame may come before it: take one at a time
        wait_until(lambda: acquire(real.prefix, 1) and edge.counts()["FramesIn"], 60, "a frame")
        before = edge.settled()
        first = acquire(real.prefix, 0)
        last = acquire(real.prefix, 20)
        counts = edge.settled(
            lambda c: c["FramesIn"] >= before["FramesIn"] + 20 and not c["InFlight"]
        )
    finally:
        edge.stop()
    assert last - first == 20
    grew = {name: counts[name] - before[name] for name in ("FramesIn", "FramesOut")}
    assert grew == {"FramesIn": 20, "FramesOut": 20}, (before, counts)
    assert counts["BadFrames"] == counts["Dropped"] == counts["MissedFrames"] == 0, counts


def test_ophyd_v1_detector_files_on_the_real_ioc_even_after_lazy_open(real, tmp_path):
    """edgeloop's ophyd v1 AreaDetector on the real NDFileHDF5, left with LazyOpen Yes (as
    ophyd-async leaves it): staging sets what the resource's file name relies on."""
    from bluesky.plans import count
    from caproto.sync.client import write

    from edgeloop.bluesky_plans import AreaDetector

    write(f"{real.prefix}HDF1:LazyOpen", 1, notify=True, timeout=5, repeater=False)
    det = AreaDetector(real.prefix, name="det", write_path_template=f"{tmp_path}/")
    try:
        det.wait_for_connection(timeout=10 * DEADLINE_SLACK)
        if not any(det.hdf1.array_size.get()):
            det.hdf1.warmup()
        docs = run_plan(count([det], num=3))
        path, frames = read_back(docs)
    finally:
        det.destroy()
    assert path.parent == tmp_path and path.exists() and frames.shape == (3, 64, 64)
    assert frames.dtype == np.uint16


def test_ophyd_async_stock_detector_files_on_the_real_ioc(real, tmp_path):
    from bluesky.plans import count

    pytest.importorskip("ophyd_async", reason="edgeloop[async] is not installed")
    from ophyd_async.core import StaticFilenameProvider, StaticPathProvider, init_devices
    from ophyd_async.epics.adcore import ADWriterFactory
    from ophyd_async.epics.adsimdetector import SimDetector

    with run_engine() as engine:
        path_provider = StaticPathProvider(StaticFilenameProvider("real"), tmp_path)
        with init_devices(timeout=10 * DEADLINE_SLACK):
            det = SimDetector(real.prefix, ADWriterFactory.hdf(path_provider))
        docs = run_plan(count([det], num=3), engine=engine)
    path, frames = filed_frames(docs)
    assert path == tmp_path / "real.h5" and frames.shape == (3, 64, 64)


ATTRIBUTES_XML = """<?xml version="1.0" standalone="no" ?>
<Attributes>
  <Attribute name="StageX" type="EPICS_PV" source="{p}SampleX.RBV" dbrtype="DBR_DOUBLE"
             description="sample stage x (um)"/>
  <Attribute name="StageY" type="EPICS_PV" source="{p}SampleY.RBV" dbrtype="DBR_DOUBLE"
             description="sample stage y (um)"/>
</Attributes>
"""


def test_a_scan_on_the_real_ioc_with_a_beamlines_attributes_file_is_retrained_from(
    real, tmp_path, request
):
    """The real camera stamps each frame with the simulated stage's position through an
    NDAttributes file of EPICS_PV attributes named as a beamline might (StageX, StageY);
    with [positions] saying so, the run is recorded, read with its positions and retrained
    from (the real pipeline: phase retrieval for labels, training, gate, deploy)."""
    from concurrent.futures import ThreadPoolExecutor

    from caproto.sync.client import read, write

    from edgeloop.bluesky_plans import AreaDetector, RunIndex, ptycho_scan
    from edgeloop.bluesky_plans.devices import SampleStage
    from edgeloop.registry import Registry
    from edgeloop.remote.executor_slot import ExecutorSlot
    from edgeloop.remote.pipeline import RetrainPipeline
    from edgeloop.scanfile import read_scan
    from tests.kit.progress import Recorder

    with beamline_ioc(tmp_path / "stage", ca_port("area_detector_own"), request) as sim:
        attributes = tmp_path / "stage_attributes.xml"
        attributes.write_text(ATTRIBUTES_XML.format(p=sim.prefix))
        write(
            f"{real.prefix}cam1:NDAttributesFile",
            str(attributes),
            notify=True,
            timeout=5,
            repeater=False,
        )
        status = read(f"{real.prefix}cam1:NDAttributesStatus", timeout=5, repeater=False).data[0]
        assert status == b"Attributes file OK", f"the real IOC refused {attributes}: {status}"

        cfg, _ = small_config(tmp_path / "loop", random_prefix("n"))
        cfg.positions.x, cfg.positions.y = "StageX", "StageY"
        cfg.data_path.mkdir(parents=True)
        det = AreaDetector(real.prefix, name="det", write_path_template=f"{cfg.data_path}/")
        stage = SampleStage(sim.prefix, name="stage")
        try:
            for device in (det, stage):
                device.wait_for_connection(timeout=10 * DEADLINE_SLACK)
            det.hdf1.warmup()  # a frame, so the plugin knows its size (and the attributes)
            with run_engine() as engine:
                engine.subscribe(RunIndex(cfg.data_path, cfg.positions))
                docs = run_plan(ptycho_scan(det, stage, num=12, step=0.05), engine=engine)
        finally:
            det.destroy(), stage.destroy()

    (entry,) = cfg.data_path.glob("run_*.json")
    scan = read_scan(entry)
    events = of(docs, "event")
    moved = [[e["data"]["stage_x"], e["data"]["stage_y"]] for e in events]
    np.testing.assert_allclose(scan["positions_um"], moved, atol=1e-3)
    assert scan["frames"].shape == (12, 64, 64)

    registry = Registry(cfg.registry_path)
    slot = ExecutorSlot("threads", lambda name: ThreadPoolExecutor(1), ThreadPoolExecutor(1))
    deployed = []
    try:
        pipeline = RetrainPipeline(
            cfg,
            registry,
            slot,
            Recorder(),
            lambda v: (deployed.append(v), registry.mark_accepted(v)),
        )
        result = pipeline.run("a scan on the real IOC")
    finally:
        slot.shutdown()
    assert deployed == [result["version"]] and result["kind"] == "ptychonn"
    assert str(entry) in json.dumps(registry.meta(result["version"]))  # trained from this run
