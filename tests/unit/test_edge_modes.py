"""The edge server's HEDM mode at the edges of the problem, fed frames a test-owned p4p server
posts: no peaks, saturated and border peaks, an unknown Mode, and switching modes."""

import numpy as np
import pytest

from edgeloop import ntnd
from edgeloop.app.answers import PeakCollector
from edgeloop.ioc.hedm_sim import add_pseudo_voigt
from tests.kit.answers import post

pytestmark = [pytest.mark.timeout(300)]


def _hedm(image, uid, omega=0.0):
    return ntnd.build(image.astype(np.uint16), uid, {"Mode": "hedm", "SampleRot": omega})


def test_hedm_frames_without_peaks_with_saturated_and_border_peaks(fed_edge):
    system, source = fed_edge
    p = system.prefix
    peaks = PeakCollector(system.ctx, f"{p}edge:Peaks").wait_connected()
    rng = np.random.default_rng(1)
    blank = rng.poisson(20.0, (256, 256))
    post(source, _hedm(blank, 1))
    signal = np.zeros((256, 256))
    add_pseudo_voigt(signal, 100.3, 120.6, 3000.0, 2.0, 2.2, 0.3)  # ordinary
    add_pseudo_voigt(signal, 2.2, 60.4, 3000.0, 2.0, 2.0, 0.3)  # 2 px from the left edge
    add_pseudo_voigt(signal, 180.0, 40.0, 4e5, 2.5, 2.5, 0.0)  # clips at 65535
    image = np.clip(rng.poisson(20.0 + signal), 0, 65535)
    post(source, _hedm(image, 2))
    tables = peaks.take([1, 2], 30)
    peaks.close()
    assert len(tables[1]["x"]) == 0  # no peaks: a table with zero rows, still identified
    t = tables[2]
    assert len(t["x"]) == 3 and list(t["uniqueId"]) == [2, 2, 2]
    order = np.argsort(t["x"])
    assert list(t["border"][order]) == [True, False, False]
    assert list(t["saturated"][order]) == [False, False, True]
    assert t["max"][order][2] == 65535
    # positions come from the untrained model here: only the finder's pixel is reliable, and
    # the edge's check keeps a centre within one patch width (model.patch) of it
    np.testing.assert_allclose(t["y"][order], [60.4, 120.6, 40.0], atol=system.cfg.model.patch + 1)
    system.wait_value("edge:FramesOut", lambda v: v >= 2, 10)
    assert system.value("edge:PeakCount") == 3
    assert system.value("edge:Mode") == "hedm"


def test_unknown_mode_is_a_bad_frame_and_modes_switch_per_frame(fed_edge):
    system, source = fed_edge
    before = system.settled()
    bad, out = before["BadFrames"], before["FramesOut"]
    post(source, ntnd.build(np.ones((64, 64), np.uint16), 11, {"Mode": "xrf"}))
    system.wait_value("edge:BadFrames", lambda v: v == bad + 1, 10)
    # refusals are summarised once per edge.bad_frame_report_s, after the count moves
    system.wait_value("edge:Message", lambda m: "xrf" in m, 10)
    assert system.pv("edge:Message")["alarm.severity"] == 1
    post(source, ntnd.build(np.ones((64, 64), np.int32), 12, {"Mode": "ptycho"}))
    system.wait_value("edge:FramesOut", lambda v: v == out + 1, 10)
    assert system.value("edge:Mode") == "ptycho"
    post(source, _hedm(np.full((128, 128), 20), 13))
    system.wait_value("edge:FramesOut", lambda v: v == out + 2, 10)
    assert system.value("edge:Mode") == "hedm" and system.value("edge:PeakCount") == 0
    assert system.value("edge:BadFrames") == bad + 1


def test_positions_come_from_the_attributes_the_configuration_names(tmp_path):
    """A beamline whose attributes file names the stage StageX/StageY: those place a frame
    in the map; SampleX/SampleY, not configured there, do not."""
    from edgeloop.app.answers import AnswerCollector
    from tests.kit.isolated import IsolatedEdge
    from tests.kit.servers import small_config

    cfg, _ = small_config(tmp_path, "Tpos:")
    cfg.positions.x, cfg.positions.y = "StageX", "StageY"
    edge = IsolatedEdge(cfg)
    try:
        phase = AnswerCollector(edge.ctx, f"{cfg.prefix}edge:Phase").wait_connected()
        frame = np.ones((64, 64), np.uint16)
        post(edge.source, ntnd.build(frame, 1, {"Mode": "ptycho", "StageX": 0.25, "StageY": -0.5}))
        post(
            edge.source, ntnd.build(frame, 2, {"Mode": "ptycho", "SampleX": 0.25, "SampleY": 0.5})
        )
        answers = phase.take({1, 2}, 30)
        phase.close()
    finally:
        edge.close()
    placed = answers[1].attributes
    assert (placed["SampleX"], placed["SampleY"]) == (0.25, -0.5)  # the edge's own names
    assert "SampleX" not in answers[2].attributes  # answered, not placed
