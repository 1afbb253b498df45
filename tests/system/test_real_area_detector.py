"""The simulated detector against the real one: the real simDetector IOC of
``../shared/adsim`` (ADSimDetector on ADCore) serves every record of the committed ADCore
table with the table's type, count and enum strings, and the simulation serves each of them
the same way."""

import pytest

from edgeloop.ioc.adcore_db import load_table
from edgeloop.waiting import wait_until
from tests.kit.areadetector import beamline_ioc
from tests.kit.env import TEST_ENV, ca_port, random_prefix
from tests.kit.real_ad import real_sim_detector, served_records
from tests.kit.servers import System, small_config


def expected(prefix: str) -> dict[str, dict]:
    """The table's view of each record, as served_records reports it."""
    want = {}
    for plugin, records in load_table().items():
        for name, view in records.items():
            kind = {"DOUBLE": "DOUBLE", "LONG": "LONG", "ENUM": "ENUM", "STRING": "STRING",
                    "CHAR": "CHAR", "INT": "INT", "FLOAT": "FLOAT"}[view["type"]]  # fmt: skip
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
    completion); its ArrayCounter after them."""
    from caproto.sync.client import read, write

    settings = {"ImageMode": 1, "NumImages": frames, "AcquireTime": 0.001}
    settings.update(AcquirePeriod=period_s, ArrayCallbacks=1)
    for name, value in settings.items() if frames else ():
        write(f"{prefix}cam1:{name}", value, notify=True, timeout=5)
    if frames:
        write(f"{prefix}cam1:Acquire", 1, notify=True, timeout=frames * period_s + 30)
    return int(read(f"{prefix}cam1:ArrayCounter_RBV", timeout=5).data[0])


@pytest.mark.parametrize("compressor", ["", "LZ4", "BSLZ4", "Blosc"])
def test_the_edge_answers_every_frame_of_the_real_ioc(real, tmp_path, compressor):
    """The edge on the real NDPluginPva's NTNDArrays: raw (Pva1:Image), or compressed by the
    real NDPluginCodec (Pva2:Image); every frame answered, none refused."""
    from caproto.sync.client import write

    image = "Pva2:Image" if compressor else "Pva1:Image"
    if compressor:
        write(f"{real.prefix}Codec1:Compressor", compressor, notify=True, timeout=5)
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
