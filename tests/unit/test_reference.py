"""The live reference error (remote/reference.py): NN versus conventional analysis on a
window of a scan, checked against the simulators' truth."""

import numpy as np
import pytest
import torch
from torch import nn

from edgeloop.bluesky_plans.plans import spiral_positions
from edgeloop.config import Config
from edgeloop.ioc.hedm_sim import HedmSimulator
from edgeloop.ioc.physics import PtychoSimulator
from edgeloop.models import kind as model_kind
from edgeloop.remote.peakfit import fit_patches
from edgeloop.remote.reference import (
    REF_WINDOW,
    hedm_reference,
    phase_errors,
    pick_windows,
    ptycho_reference,
)

pytestmark = pytest.mark.timeout(120)


# 20 consecutive points of a spiral, 100 epochs: about 2 s on one thread and a reference
# within ~0.011 rad of the truth (the service's default, 30 points and 200 epochs, holds
# further out on the spiral too: benchmarks/reference.py)
WINDOW = slice(100, 120)
EPOCHS = 100


class Fixed(nn.Module):
    """A 'network' that answers the given phases for a batch of that many frames."""

    def __init__(self, phase: np.ndarray):
        super().__init__()
        self.phase = torch.from_numpy(np.asarray(phase, np.float32))[:, None]

    def forward(self, x):
        assert len(x) == len(self.phase)
        return torch.ones_like(self.phase), self.phase


class FitPredictor(nn.Module):
    """A 'BraggNN' answering the pseudo-Voigt fit of each patch, plus a shift in pixels."""

    def __init__(self, patch: int, shift=(0.0, 0.0)):
        super().__init__()
        self.patch, self.shift = patch, np.asarray(shift)

    def forward(self, x):
        centres, ok = fit_patches(x[:, 0].numpy())
        assert ok.all()  # the reference keeps only patches it fitted
        return (torch.from_numpy((centres + self.shift) / self.patch).float(),)


@pytest.fixture(scope="module")
def cfg():
    return Config()


@pytest.fixture(scope="module")
def window(cfg):
    sim = PtychoSimulator(cfg.sim)
    positions = spiral_positions(500, 0.05, (0.2, -0.15))[WINDOW]
    frames = np.stack([sim.frame(x, y) for x, y in positions])
    truth = np.stack([sim.true_phase(x, y) for x, y in positions])
    return frames, positions, truth


@pytest.fixture(scope="module")
def hedm_frames(cfg):
    sim = HedmSimulator(cfg.hedm)
    return [sim.frame(omega)[0] for omega in (10.0, 40.0, 70.0)]


def test_pick_windows_samples_a_few_percent():
    (only,) = pick_windows(500)
    assert len(only) == REF_WINDOW and only.start > 0 and only.stop < 500  # mid-scan, 6 %
    windows = pick_windows(4000, fraction=0.03, window=30)
    assert len(windows) == 4
    assert sum(map(len, windows)) == pytest.approx(0.03 * 4000, rel=0.01)
    assert all(a.stop <= b.start for a, b in zip(windows, windows[1:]))  # ordered, disjoint
    assert windows[0].start > 0 and windows[-1].stop <= 4000
    assert pick_windows(25) == [range(25)]  # short scan: whole, when it is enough to overlap
    assert pick_windows(10) == []
    with pytest.raises(ValueError):
        pick_windows(500, fraction=0)


def test_phase_errors_ignore_each_frames_offset():
    rng = np.random.default_rng(0)
    ref = rng.uniform(-1, 1, (3, 8, 8))
    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    offsets = np.array([0.3, -1.0, 2.0])[:, None, None]
    assert np.allclose(phase_errors(ref + offsets, ref, mask), 0)
    noisy = ref + offsets + 0.1 * np.sign(rng.standard_normal(ref.shape))
    assert np.all(phase_errors(noisy, ref, mask) > 0.05)
    bad = ref.copy()
    bad[:, 0, 0] += 5.0  # outside the mask: not counted
    assert np.allclose(phase_errors(bad, ref, mask), 0)


def test_ptycho_reference_tells_a_good_network_from_an_untrained_one(cfg, window):
    frames, positions, truth = window
    perfect = ptycho_reference(
        frames, positions, Fixed(truth), cfg, epochs=EPOCHS, threads=1, truth=truth
    )
    assert perfect["frames"] == len(frames) and perfect["skipped"] == 0
    # a network that answers the truth is scored with the reference's own error
    assert perfect["reference_error"] == pytest.approx(perfect["reference_truth_error"])
    assert perfect["nn_truth_error"] == pytest.approx(0, abs=1e-6)
    assert perfect["reference_error"] < 0.02

    torch.manual_seed(0)
    untrained = model_kind("ptychonn").build(**cfg.arch("ptychonn"))
    bad = ptycho_reference(
        frames, positions, untrained, cfg, epochs=EPOCHS, threads=1, truth=truth
    )
    assert bad["reference_error"] > 4 * perfect["reference_error"]
    # the reference error follows the true error within the reference's own
    assert abs(bad["reference_error"] - bad["nn_truth_error"]) <= bad["reference_truth_error"]
    assert untrained.training  # its mode is left as it was


def test_ptycho_reference_leaves_out_bad_frames_and_checks_sizes(cfg, window):
    frames, positions, truth = window
    frames = frames.astype(np.float32)
    frames[3, 5, 5] = np.nan
    res = ptycho_reference(frames, positions, Fixed(np.delete(truth, 3, 0)), cfg, epochs=2)
    assert res["frames"] == len(frames) - 1 and res["skipped"] == 1
    assert np.isfinite(res["reference_error"])
    with pytest.raises(ValueError, match="network takes"):
        ptycho_reference(frames[:, :32, :32], positions, Fixed(truth), cfg, epochs=2)
    with pytest.raises(ValueError, match="positions"):
        ptycho_reference(frames, positions[:-1], Fixed(truth), cfg, epochs=2)


def test_hedm_reference_measures_a_known_shift(cfg, hedm_frames):
    size = cfg.model.patch
    exact = hedm_reference(hedm_frames, FitPredictor(size), cfg, max_peaks=20)
    assert exact["peaks"] >= 10 and exact["frames"] == 3
    assert exact["reference_error"] < 1e-4
    shifted = hedm_reference(hedm_frames, FitPredictor(size, (0.3, -0.4)), cfg, max_peaks=20)
    assert shifted["peaks"] == exact["peaks"]
    assert shifted["reference_error"] == pytest.approx(0.5, abs=1e-4)
    assert shifted["offset"] == pytest.approx((0.3, -0.4), abs=1e-4)


def test_hedm_reference_leaves_out_border_saturated_and_bad_frames(cfg, hedm_frames):
    frame = hedm_frames[0].astype(np.float64)
    ceiling = frame.copy()
    ceiling[250:253, 250:253] = cfg.hedm.saturation  # a saturated peak
    ceiling[0:3, 100:103] = 5000  # a peak at the border
    nan = frame.copy()
    nan[0, 0] = np.nan
    base = hedm_reference([frame], FitPredictor(cfg.model.patch), cfg, max_peaks=1000)
    res = hedm_reference([ceiling, nan], FitPredictor(cfg.model.patch), cfg, max_peaks=1000)
    assert res["skipped"] == 1 and res["frames"] == 1
    assert res["candidates"] == base["candidates"] + 2
    assert res["peaks"] + res["fit_failed"] == base["peaks"] + base["fit_failed"]
    none = hedm_reference([], FitPredictor(cfg.model.patch), cfg)
    assert none["peaks"] == 0 and np.isnan(none["reference_error"])


def test_the_service_samples_windows_of_frames_from_the_stream():
    """ReferenceMonitor (remote/reference_monitor.py) on NTNDArrays as the detector sends
    them: a window at the start of each acquisition and every ``reference_every`` frames;
    a window that lost a frame to a squashing monitor is still analysed, one that lost more
    than a quarter is counted incomplete; the next window is skipped (counted) while one
    waits."""
    from edgeloop import ntnd
    from edgeloop.remote.reference_monitor import ReferenceMonitor

    cfg = Config()
    cfg.remote.reference_window, cfg.remote.reference_every = 4, 10
    monitor = ReferenceMonitor(cfg, ctx=None, registry=None, put=None)

    def send(uid, mode="ptycho"):
        attrs = {"Mode": mode, "SampleX": 0.01 * uid, "SampleY": 0.0}
        monitor._on_frame(ntnd.build(np.zeros((8, 8), np.float32), uid, attrs))

    for uid in range(1, 13):  # frames 1-4 make a window; 11, 12 start the next
        send(uid)
    window = monitor._jobs.get_nowait()
    assert [f.unique_id for _, f in window] == [1, 2, 3, 4]
    assert [f.unique_id for _, f in monitor._window] == [11, 12]
    send(14)  # 13 is missing: 11, 12 and 14 are three quarters of the window
    send(15)
    assert [f.unique_id for _, f in monitor._jobs.get_nowait()] == [11, 12, 14]
    assert not monitor._window and monitor.incomplete == 0
    send(21)
    send(23)  # 22 missing, then 24 too: the window ends at 25 with half its frames
    send(25)
    assert monitor._jobs.empty() and monitor.incomplete == 1
    send(31)  # a window cut short by a new acquisition is judged the same way
    for uid in range(1, 5):  # a new acquisition (uniqueId restarts): a new window
        send(uid)
    assert [f.unique_id for _, f in monitor._jobs.get_nowait()] == [1, 2, 3, 4]
    for uid in range(1, 5):
        send(uid)  # queued, then the next full window finds the queue full: skipped
    for uid in range(1, 5):
        send(uid)
    assert monitor.skipped == 1 and monitor.incomplete == 2
    send(5, mode="other")  # not a technique: ignored
    assert monitor.skipped == 1
