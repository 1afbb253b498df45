"""The scientist's session: the IPython profile `edgeloop ipython-profile` writes, run by a
real IPython; the tutorial's Python snippets, run as written (prefix and data folder aside)
against a whole loop of their own; the live plot and progress bar during real scans."""

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from edgeloop.bluesky_plans import (
    EdgeLivePlot,
    ScanProgress,
    hedm_rotation_scan,
    make_devices,
    ptycho_scan,
)
from edgeloop.waiting import holds_for, wait_until
from tests.kit.figures import draws_coalesced
from tests.kit.servers import whole_system

matplotlib.use("Agg")
pytestmark = [pytest.mark.timeout(600)]
TUTORIAL = Path(__file__).resolve().parents[2] / "docs" / "tutorial.md"


@pytest.fixture(scope="module")
def loop(tmp_path_factory, request):
    """A whole loop of this module's own: the session's RetrainTrigger retrains it."""
    tmp = tmp_path_factory.mktemp("session")
    with whole_system(tmp, "i", request, "second_beamline") as sys_:
        yield sys_


def test_ipython_profile_opens_a_session_that_scans(loop, tmp_path):
    ipython_dir = tmp_path / "ipython"
    cli = [sys.executable, "-m", "edgeloop.app.cli", "ipython-profile", "--simulated"]
    done = subprocess.run(
        [*cli, "--prefix", loop.prefix, "--config", str(loop.config_path)]
        + ["--ipython-dir", str(ipython_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "ipython --profile=edgeloop" in done.stdout, done.stderr
    code = (
        "from edgeloop.waiting import wait_until; "
        "RE(ptycho_scan(det, stage, num=12, step=0.05)); "
        "wait_until(lambda: live.phase_map is not None, 60, 'edge:PhaseMap'); live.redraw(); "
        "print('MAP', None if live.phase_map is None else live.phase_map.shape); "
        "det.destroy(); stage.destroy(); live.close()"
    )
    ipython = Path(sys.executable).with_name("ipython")
    env = dict(os.environ, MPLBACKEND="Agg")
    run = subprocess.run(
        [str(ipython), f"--ipython-dir={ipython_dir}", "--profile=edgeloop", "-c", code],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"edgeloop session on {loop.prefix}" in run.stdout
    assert "MAP (640, 640)" in run.stdout, run.stdout
    assert "Transient Scan ID" in run.stdout  # the live table
    assert "ptycho_scan" in run.stderr and "12/12" in run.stderr  # the progress bar


def tutorial_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", TUTORIAL.read_text(), flags=re.S)


def test_the_tutorials_snippets_run_as_written(loop, monkeypatch):
    snippets = tutorial_snippets()
    data = loop.cfg.data_path / "tutorial"  # under the simulation's data directory, as
    # ~/.edgeloop/data/detector is under a user's (its file plugin writes nowhere else)
    assert snippets, "the tutorial has Python snippets"
    monkeypatch.setenv("BLUESKY_DEBUG_CALLBACKS", "1")  # a callback's error fails the run
    namespace: dict = {}
    try:
        with draws_coalesced():
            for code in snippets:
                code = code.replace('"SIM:"', repr(loop.prefix))
                code = code.replace("~/.edgeloop/data", str(data))
                exec(compile(code, str(TUTORIAL), "exec"), namespace)
        runs = sorted(data.glob("run_*.json"))
        assert len(runs) == 3  # the two fly scans and the step scan, each pointing at
        assert len(list((data / "detector").glob("*.h5"))) == 3  # its file
        live = namespace["live"]
        live.redraw()
        assert live.technique == "hedm" and len(live.peak_counts) >= 100
    finally:
        for name in ("det", "stage"):
            if name in namespace:
                namespace[name].destroy()
        if "live" in namespace:
            namespace["live"].close()
        if "RE" in namespace:
            loop_ = namespace["RE"].loop
            loop_.call_soon_threadsafe(loop_.stop)
    # the RetrainTrigger asked for retraining after the runs: the loop retrains
    loop.wait_value("ml:Status", lambda v: v["index"] != 0, 60)


def test_live_plot_shows_the_edge_answers_and_the_bar_counts_points(loop, RE):
    det, stage = make_devices(loop.prefix, loop.cfg.data_path / "detector")
    live = EdgeLivePlot(loop.prefix)
    bar_text = io.StringIO()
    RE.subscribe(live)
    RE.subscribe(ScanProgress(file=bar_text))
    try:
        RE(ptycho_scan(det, stage, num=30, step=0.05))
        loop.wait_value("edge:FramesOut", lambda v: v >= 30, 30)
        covered = lambda: live.phase_map is not None and np.count_nonzero(live.phase_map) > 1000  # noqa: E731
        wait_until(covered, 60, "the scan's points in the live map")
        live.redraw()
        image = live._artist.get_array()
        assert image.shape == (640, 640) and np.count_nonzero(image) > 1000
        assert "30/30" in bar_text.getvalue()
        RE(hedm_rotation_scan(det, stage.rot, 0.0, 4.0, 10))
        loop.wait_value("edge:FramesOut", lambda v: v >= 40, 30)
        every_frame = lambda: sorted(live.peak_counts) == list(range(1, 11))  # noqa: E731
        wait_until(every_frame, 60, "edge:Peaks of the rotation's 10 frames")
        live.redraw()
        uids, counts = live._artist.get_data()
        assert list(uids) == list(range(1, 11)) and max(counts) > 0
        assert live.ax.get_ylabel() == "Bragg peaks (edge:Peaks)"
    finally:
        live.close()
        det.destroy()
        stage.destroy()


def test_two_systems_with_different_prefixes_run_side_by_side_without_interfering(
    loop, system, RE
):
    """The session's loop and this module's, on one host: frames, counts and messages of
    one never reach the other."""
    before = {s.prefix: s.value("edge:FramesIn") for s in (loop, system)}
    det, stage = make_devices(loop.prefix, loop.cfg.data_path / "detector")
    try:
        RE(ptycho_scan(det, stage, num=20, step=0.05))
    finally:
        det.destroy()
        stage.destroy()
    loop.wait_value("edge:FramesIn", lambda v: v >= before[loop.prefix] + 20, 30)
    holds_for(  # the other edge's counter, posted every stats_publish_s, never moves
        lambda: system.value("edge:FramesIn") == before[system.prefix],
        4 * system.cfg.edge.stats_publish_s,
        f"{system.prefix}edge:FramesIn unchanged",
    )
    loop.ctx.put(f"{loop.prefix}ml:Message", "only this loop's message", timeout=5)
    assert loop.value("ml:Message") == "only this loop's message"
    assert system.value("ml:Message") != "only this loop's message"
