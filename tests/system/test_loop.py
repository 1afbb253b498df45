"""Integration: the real servers on loopback, through real clients (p4p, pvapy, caproto,
ophyd, bluesky)."""

import json
import time

import numpy as np
import pytest
from caproto.sync import client as ca_client

from edgeloop import ntnd
from edgeloop.app.answers import AnswerCollector
from edgeloop.app.loop import wait_drained
from edgeloop.registry import Registry
from tests.kit.models import add_approved
from tests.kit.runs import run_engine

pytestmark = [pytest.mark.timeout(300)]


def ca_get(pv, **kwargs):  # caget; no CA repeater daemon left behind
    return ca_client.read(pv, repeater=False, **kwargs)


def ca_put(pv, value, **kwargs):  # caput
    return ca_client.write(pv, value, repeater=False, **kwargs)


def acquire(system, n, period_s=None):
    """``n`` frames; at ``period_s`` if given, the detector's own period restored after."""
    p = system.prefix
    ca_put(f"{p}det:cam1:NumImages", n, notify=True, timeout=5)
    if period_s is None:
        ca_put(f"{p}det:cam1:Acquire", 1, notify=True, timeout=120)
        return
    period = f"{p}det:cam1:AcquirePeriod"
    before = float(ca_get(period, timeout=5).data[0])
    ca_put(period, period_s, notify=True, timeout=5)
    try:
        ca_put(f"{p}det:cam1:Acquire", 1, notify=True, timeout=120)
    finally:
        ca_put(period, before, notify=True, timeout=5)


def test_frames_are_valid_ntndarray_for_p4p_and_pvapy(system):
    import pvaccess

    acquire(system, 1)
    value = system.pv("det:Pva1:Image")
    assert value.getID() == "epics:nt/NTNDArray:1.0"
    frame = ntnd.decode(value)
    assert frame.data.shape == (64, 64) and frame.data.dtype == np.int32
    assert frame.data.sum() > 0.9 * system.cfg.sim.photons
    assert {"SampleX", "SampleY", "ColorMode"} <= set(frame.attributes)
    assert frame.unique_id == ca_get(f"{system.prefix}det:cam1:ArrayCounter_RBV").data[0]

    ch = pvaccess.Channel(f"{system.prefix}det:Pva1:Image", pvaccess.PVA)
    pv = ch.get("field()")
    assert pv["uniqueId"] == frame.unique_id
    dims = [d["size"] for d in pv["dimension"]]
    assert dims == [64, 64]
    pixels = pv["value"][0]["intValue"]
    np.testing.assert_array_equal(np.asarray(pixels).reshape(64, 64), frame.data)


def test_one_phase_output_per_frame_with_matching_unique_id(system):
    phase = AnswerCollector(system.ctx, f"{system.prefix}edge:Phase")
    amplitude = AnswerCollector(system.ctx, f"{system.prefix}edge:Amplitude")
    phase.wait_connected(), amplitude.wait_connected()
    phase.frames.clear()
    amplitude.frames.clear()
    start = int(ca_get(f"{system.prefix}det:cam1:ArrayCounter_RBV").data[0])
    missed = system.value("edge:MissedFrames")
    # at 50 Hz, not in one burst: a starved edge then has the 0.6 s that its input monitor's
    # 32 frames take to arrive before the transport squashes one (a loaded machine once
    # lost 7 of a burst of 40)
    acquire(system, 40, period_s=0.02)
    expected = set(range(start + 1, start + 41))
    # every frame settled at the edge first (answered, dropped or refused), then its answers
    system.wait_value("edge:FramesIn", lambda v: v >= start + 40, 120)
    system.wait_value("edge:InFlight", lambda v: v == 0, 120)
    got_p = phase.wait_ids(expected, timeout=120)
    got_a = amplitude.wait_ids(expected, timeout=120)
    phase.close()
    amplitude.close()
    names = ("FramesOut", "Dropped", "BadFrames", "MissedFrames")
    counters = {n: system.value(f"edge:{n}") for n in names}
    missing = sorted(expected - set(got_p)), sorted(expected - set(got_a))
    # a frame that never reached the edge (the transport squashed it on a starved host) is
    # no answer lost: the edge counts it in MissedFrames, which says so
    lost = counters["MissedFrames"] - missed
    assert missing[0] == missing[1] and len(missing[0]) == lost, (missing, counters)
    assert lost <= 4, f"{lost} of 40 frames never reached the edge ({counters})"
    out = got_p[start + 40]
    assert out.data.shape == (64, 64) and out.data.dtype == np.float32
    assert np.all(np.abs(out.data) <= np.pi)
    system.wait_value("edge:FramesOut", lambda v: v >= start + 40, 10)
    assert system.value("edge:Dropped") == 0
    assert system.value("edge:FrameRate") >= 0 and system.value("edge:LatencyMs") > 0


def test_detector_codec_frames_decode_in_pvapy_and_at_the_edge(system):
    """det:Codec1 compresses as NDPluginCodec: pvapy's own decoder reads the frames, the
    edge answers them, and the compression factor is published."""
    import pvaccess
    from pvapy.utility.adImageUtility import AdImageUtility

    p = system.prefix
    out, bad = system.value("edge:FramesOut"), system.value("edge:BadFrames")
    choices = {"lz4": "LZ4", "bslz4": "BSLZ4", "blosc": "Blosc"}  # pvapy's codecs
    try:
        ca_put(f"{p}det:Codec1:EnableCallbacks", "Enable", notify=True, timeout=5)
        for codec in (*choices, "zlib"):
            ca_put(f"{p}det:Codec1:Compressor", choices.get(codec, "Zlib"), notify=True)
            acquire(system, 2)
            mine = ntnd.decode(system.pv("det:Pva1:Image"))
            assert ca_get(f"{p}det:Codec1:CompFactor_RBV").data[0] > 1.2
            value = pvaccess.Channel(f"{p}det:Pva1:Image", pvaccess.PVA).get("field()")
            assert value["codec"]["name"] == codec
            if codec in choices:
                image = AdImageUtility.reshapeNtNdArray(value)[1]
                np.testing.assert_array_equal(image, mine.data)
    finally:
        ca_put(f"{p}det:Codec1:EnableCallbacks", "Disable", notify=True, timeout=5)
    system.wait_value("edge:FramesOut", lambda v: v >= out + 8, 20)
    assert system.value("edge:BadFrames") == bad
    acquire(system, 1)
    assert system.pv("det:Pva1:Image")["codec.name"] == ""


def test_real_ioc_serves_every_ml_record_over_ca_and_pva(system):
    import pvaccess

    p = system.prefix
    for name in (
        "ml:Retrain",
        "ml:Status",
        "ml:ModelVersion",
        "ml:ValLoss",
        "ml:Message",
        "ml:Endpoint",
        "ml:Progress",
        "ml:Abort",
        "ml:Rollback",
        "ml:StagingTime",
        "ml:AnalysisTime",
        "ml:TrainingTime",
        "ml:ReturnTime",
        "ml:EndToEndTime",
    ):
        assert ca_get(f"{p}{name}", timeout=5).data is not None  # Channel Access (RSRV)
        assert system.pv(name) is not None  # pvAccess (QSRV2) via p4p
        assert pvaccess.Channel(f"{p}{name}", pvaccess.PVA).get() is not None  # via pvapy
    assert system.pv("ml:Status")["value.choices"] == [
        "Idle",
        "Staging",
        "Analyzing",
        "Training",
        "Validating",
        "Deploying",
        "Error",
    ]
    assert system.value("ml:Endpoint") == "local"


def test_records_carry_units_precision_limits_and_alarm_limits(system):
    """What any client (caget, Phoebus, ophyd) shows: the ML IOC's records over CA, the edge's
    scalars over PVA, and the beamline's motor readbacks through ophyd."""
    from edgeloop.bluesky_plans import make_devices

    p = system.prefix
    meta = ca_get(f"{p}ml:EndToEndTime", data_type="control").metadata
    assert meta.units == b"s" and meta.precision == 2
    assert (meta.upper_warning_limit, meta.upper_alarm_limit) == (600, 3600)
    assert ca_get(f"{p}ml:Progress", data_type="control").metadata.units == b"%"
    latency = system.pv("edge:LatencyMs")
    assert latency["display.units"] == "ms" and latency["display.precision"] == 1
    assert "latency" in latency["display.description"].lower()
    assert latency["valueAlarm.highWarningLimit"] == system.cfg.edge.latency_warn_ms
    assert system.pv("edge:FramesIn")["display.units"] == "frames"
    det, stage = make_devices(p, system.cfg.data_path / "detector")
    try:
        readback = stage.x.user_readback
        assert readback.describe()[readback.name]["precision"] == 4
        assert readback.describe()[readback.name]["units"] == "um"
    finally:
        det.destroy()
        stage.destroy()


def test_corrupt_model_is_rejected_and_old_one_keeps_serving(system):
    reg = Registry(system.cfg.registry_path)
    serving = system.value("edge:ModelVersion")
    security = system.cfg.security  # signed, as a file the gate passed and a disk damaged
    bad_load = add_approved(
        reg, b"this is not a torch checkpoint", {"kind": "ptychonn", "val_loss": 0.1}, security
    )
    with pytest.raises(Exception, match="does not load"):
        system.ctx.put(f"{system.prefix}edge:LoadModel", bad_load, wait=True, timeout=30)
    # a model file damaged after it was registered fails its checksum
    good = add_approved(
        reg,
        reg.read_verified(serving) if serving else _fresh_model_bytes(),
        {"kind": "ptychonn", "val_loss": 0.1},
        security,
    )
    path = reg.root / f"v{good:04d}.pt"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(Exception, match="checksum"):
        system.ctx.put(f"{system.prefix}edge:LoadModel", good, wait=True, timeout=30)
    with pytest.raises(Exception, match="integer|>= 1"):
        system.ctx.put(f"{system.prefix}edge:LoadModel", -4, wait=True, timeout=30)
    assert system.value("edge:ModelVersion") == serving
    assert "rejected" in system.value("edge:Message")
    assert reg.meta(bad_load)["status"] == "rejected"
    before = system.value("edge:FramesOut")
    acquire(system, 5)
    system.wait_value("edge:FramesOut", lambda v: v >= before + 5, 20)


def _fresh_model_bytes():
    from edgeloop.models import PtychoNN
    from edgeloop.registry import model_to_bytes

    return model_to_bytes("ptychonn", {"width": 16}, PtychoNN(16))


def test_out_of_range_puts_are_refused_and_nothing_moves(system):
    from caproto import ErrorResponseReceived
    from ophyd.utils import LimitError

    from edgeloop.bluesky_plans import make_devices

    p = system.prefix
    for pv, value in (
        ("det:cam1:NumImages", 0),
        ("det:cam1:AcquireTime", -1.0),
        ("det:cam1:Mode", 7),
    ):
        with pytest.raises(ErrorResponseReceived):
            ca_put(f"{p}{pv}", value, notify=True, timeout=5)
    _, stage = make_devices(p, system.cfg.data_path / "detector")
    with pytest.raises(LimitError):
        stage.x.move(100.0, wait=True)
    stage.x.move(0.1, wait=True, timeout=10)
    # a client that ignores the limits is refused by the server; the axis stays put
    with pytest.raises(ErrorResponseReceived, match="Limits"):
        ca_put(f"{p}SampleX.VAL", 50.0, notify=True, timeout=5)
    assert ca_get(f"{p}SampleX.RBV").data[0] == pytest.approx(0.1)
    assert ca_get(f"{p}SampleX.DMOV").data[0] == 1
    stage.x.move(0.0, wait=True, timeout=10)


@pytest.fixture(scope="module")
def ptycho_retrained(system):
    """A spiral scan written for retraining, then ``ml:Retrain`` written as ``caput`` would
    while frames keep streaming through the hot swap: what the edge and the ML IOC showed."""
    from edgeloop.bluesky_plans import RunIndex, make_devices, ptycho_scan

    p = system.prefix
    det, stage = make_devices(p, system.cfg.data_path / "detector")
    outputs = None
    try:
        with run_engine() as RE:
            RE.subscribe(RunIndex(system.cfg.data_path))
            RE(ptycho_scan(det, stage, num=40, step=0.05))
        old = system.value("edge:ModelVersion")
        dropped = system.value("edge:Dropped")
        outputs = AnswerCollector(system.ctx, f"{p}edge:Phase")

        ca_put(f"{p}ml:Retrain", 1, notify=True, timeout=5)
        ca_put(f"{p}det:cam1:AcquireTime", 0.02, notify=True, timeout=5)
        seen_states = set()
        deadline = time.monotonic() + 240
        while system.value("edge:ModelVersion") == old:  # stream frames through the swap
            assert time.monotonic() < deadline, system.outputs()
            acquire(system, 10)
            status = system.pv("ml:Status")
            seen_states.add(status["value.choices"][status["value.index"]])
            assert "Error" not in seen_states, system.value("ml:Message")
        acquire(system, 10)
        ca_put(f"{p}det:cam1:AcquireTime", 0.0, notify=True, timeout=5)
        system.wait_value("ml:Status", lambda v: v["index"] == 0, 30)
        ml = {
            name: system.value(f"ml:{name}")
            for name in (
                "ModelVersion",
                "Progress",
                "ValLoss",
                "EndToEndTime",
                "TrainingTime",
                "Message",
            )
        }
        wait_drained(system.ctx, p, settle_s=1.0, timeout=30)  # every frame in was answered
        return {
            "old": old,
            "new": system.value("edge:ModelVersion"),
            "ml": ml,
            "seen_states": seen_states,
            "dropped": system.value("edge:Dropped") - dropped,
            "versions": [f.attributes["ModelVersion"] for f in outputs.wait(0)],
        }
    finally:
        if outputs is not None:
            outputs.close()
        det.destroy()
        stage.destroy()


def test_pv_write_retrains_and_hot_swaps_without_dropping_frames(system, ptycho_retrained):
    r = ptycho_retrained
    assert r["new"] > r["old"]
    assert r["ml"]["ModelVersion"] == r["new"]
    assert r["ml"]["Progress"] == 100.0
    assert r["ml"]["ValLoss"] > 0
    assert r["ml"]["EndToEndTime"] >= r["ml"]["TrainingTime"] > 0
    assert "serving" in r["ml"]["Message"]
    assert r["seen_states"] & {"Analyzing", "Training"}
    assert r["dropped"] == 0
    assert r["old"] in r["versions"] and r["new"] in r["versions"]  # the stream crossed the swap
    assert r["versions"] == sorted(r["versions"])  # never back to the old model
    assert Registry(system.cfg.registry_path).accepted("ptychonn") == r["new"]


def test_the_accepted_version_has_a_record_that_verifies(system, ptycho_retrained):
    """Issue 24, item 2: the record written once the edge accepted the version, its card
    tracing it to the run it was trained on and the labels."""
    from edgeloop import approval
    from edgeloop import model_records as records

    folder = records.find(system.cfg, ptycho_retrained["new"])
    gate_pub = approval.key_paths(system.cfg.security)[1].read_bytes()
    verdict = records.verify_record(folder, gate_pub)
    assert verdict.ok, verdict.problems
    card = json.loads((folder / "card.json").read_text())
    meta = Registry(system.cfg.registry_path).meta(ptycho_retrained["new"])
    assert card["weights_sha256"] == meta["sha256"] and card["status"] == "accepted"
    (run,) = card["training_data"]["runs"]
    assert run["uid"] and run["frames"] == 40, run
    labels = card["training_data"]["labels"]
    assert labels["sha256"] == meta["labels_sha256"] and "phase retrieval" in labels["method"]
    assert card["metrics"]["held_out_loss"] == meta["val_loss"]


def test_restarted_edge_serves_the_last_accepted_model(system, ptycho_retrained, tmp_path):
    from tests.kit.servers import System

    accepted = Registry(system.cfg.registry_path).accepted("ptychonn")
    assert accepted is not None and accepted >= ptycho_retrained["new"]
    second = System(system.cfg, system.config_path, tmp_path)
    second.prefix = system.prefix + "R:"
    try:
        second.start("edge", ready_pv="edge:ModelVersion")
        assert second.value("edge:ModelVersion") == accepted
    finally:
        second.stop()


@pytest.mark.timeout(900)
def test_hedm_rotation_scan_peaks_retrain_and_hot_swap(system, RE):
    """HEDM end to end: Bluesky rotation scan -> frames over PVA -> edge:Peaks per frame
    (NTTable, read with p4p and pvapy) -> ml:Retrain -> pseudo-Voigt labels -> BraggNN
    trained -> hot swap -> peaks within a fraction of a pixel of the truth."""
    import pvaccess

    from edgeloop.app.answers import PeakCollector
    from edgeloop.app.hedm_demo import scan_errors
    from edgeloop.bluesky_plans import RunIndex, hedm_rotation_scan, make_devices, read_scan
    from edgeloop.ioc.hedm_sim import HedmSimulator

    p, cfg = system.prefix, system.cfg
    reg = Registry(cfg.registry_path)
    ptycho_accepted = reg.accepted("ptychonn")
    det, stage = make_devices(p, cfg.data_path / "detector")
    index = RunIndex(cfg.data_path)
    RE.subscribe(index)
    sim = HedmSimulator(cfg.hedm)
    tables = PeakCollector(system.ctx, f"{p}edge:Peaks")
    try:
        RE(hedm_rotation_scan(det, stage.rot, 10.0, 18.0, 40))
        scan = read_scan(index.last_path)
        assert scan["technique"] == "hedm" and scan["frames"].shape == (40, 512, 512)
        assert scan["frames"].dtype == np.uint16
        np.testing.assert_allclose(scan["omega_deg"], np.linspace(10, 18, 40), atol=1e-3)
        before_tables = tables.take(range(1, 41), 60)
        wait_drained(system.ctx, p)
        assert system.value("edge:Mode") == "hedm"
        v0 = system.value("edge:ModelVersion")
        assert v0 == (reg.accepted("braggnn") or 0)
        last = before_tables[40]
        assert system.value("edge:PeakCount") == len(last["x"]) > 5
        assert list(last["peak"]) == list(range(len(last["x"])))
        via_pvapy = pvaccess.Channel(f"{p}edge:Peaks", pvaccess.PVA).get("field()").toDict()
        assert list(via_pvapy["value"]["uniqueId"]) == [40] * len(last["x"])
        assert via_pvapy["timeStamp"]["userTag"] == 40
        err_before, _, scored = scan_errors(before_tables, scan, sim)
        assert scored > 100

        ca_put(f"{p}ml:Retrain", 1, notify=True, timeout=5)
        system.wait_value("edge:ModelVersion", lambda v: v != v0, 600)
        system.wait_value("ml:Status", lambda v: v["index"] in (0, 6), 30)
        assert system.pv("ml:Status")["value.index"] == 0, system.value("ml:Message")
        new = system.value("edge:ModelVersion")
        assert "braggnn" in system.value("ml:Message")
        assert reg.accepted("braggnn") == new and reg.meta(new)["kind"] == "braggnn"
        assert reg.accepted("ptychonn") == ptycho_accepted  # the other technique untouched

        RE(hedm_rotation_scan(det, stage.rot, 40.0, 46.0, 20))  # angles not trained on
        scan2 = read_scan(index.last_path)
        after_tables = tables.take(range(1, 21), 60)
        err_after, found, scored = scan_errors(after_tables, scan2, sim)
        assert found >= 0.95 * scored
        assert err_after.mean() < 0.35 and err_after.mean() < 0.5 * err_before.mean(), (
            err_after.mean(),
            err_before.mean(),
        )
    finally:
        tables.close()
        ca_put(f"{p}det:cam1:Mode", "ptycho", notify=True, timeout=5)
        det.destroy()
        stage.destroy()


def test_status_prints_every_pv_and_names_those_that_do_not_answer(system):
    import subprocess
    import sys

    def status(prefix):
        cmd = [sys.executable, "-m", "edgeloop.app.cli", "status", "--prefix", prefix]
        return subprocess.run([*cmd, "--beamline"], capture_output=True, text=True, timeout=60)

    p = system.prefix
    done = status(p)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines()[1:] if line.strip()}
    assert "frames" in rows[f"{p}edge:FramesIn"] and rows[f"{p}edge:FramesIn"].endswith("yes")
    assert rows[f"{p}ml:Status"].split()[1] in ("Idle", "Error")
    assert " s " in rows[f"{p}ml:EndToEndTime"]  # units
    assert rows[f"{p}SampleX.RBV"].split()[2] == "um"
    assert rows[f"{p}det:cam1:Mode"].split()[1] in ("ptycho", "hedm")
    assert len(rows) > 40
    gone = status("TNOBODY:")
    assert gone.returncode == 1
    assert "did not answer" in gone.stdout and "TNOBODY:edge:FramesIn" in gone.stdout
    assert "EPICS_PVA_ADDR_LIST='127.0.0.1'" in gone.stdout
