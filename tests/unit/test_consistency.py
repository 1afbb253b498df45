"""The edge's label-free quality figures on synthetic data whose error is known: the overlap
disagreement (stitch), the forward-model data residual (ptycho), the centroid distance (HEDM),
how they are published (units per mode)."""

import warnings

import numpy as np
import pytest

from edgeloop.bluesky_plans.plans import spiral_positions
from edgeloop.config import Config, EdgeConfig
from edgeloop.edge_pva.label_free import (
    DataResidual,
    centroid_distance,
    combine,
    edge_probe,
    load_probe,
    sqrt_poisson_deviation,
)
from edgeloop.edge_pva.peak_tables import locate_peaks
from edgeloop.edge_pva.scalars import ScalarPVs, consistency_scalars
from edgeloop.edge_pva.stitch import PhaseMap
from edgeloop.ioc.physics import PtychoSimulator


# ---- overlap disagreement ----------------------------------------------------------------
def _noisy_scan(noise_rad: float, seed: int = 0) -> list[float]:
    """Patches of one smooth object along a spiral, offset by one constant (the phase's
    offset is not measurable) and with pixel noise of ``noise_rad``: the disagreement of
    each with the map so far."""
    rng = np.random.default_rng(seed)
    n, patch, pixel = 256, 32, 0.01
    yy, xx = np.mgrid[:n, :n] / n
    obj = 0.5 * np.sin(12 * xx) * np.cos(9 * yy)
    pm, out = PhaseMap(n, patch, pixel), []
    for x, y in spiral_positions(60, 0.05):
        r, c = int(round(n / 2 - patch / 2 + y / pixel)), int(round(n / 2 - patch / 2 + x / pixel))
        truth = obj[r : r + patch, c : c + patch]
        guess = truth + 0.7 + rng.normal(0, noise_rad, truth.shape)
        d = pm.disagreement(guess, x, y)
        pm.add(guess, x, y)
        if d is not None:
            out.append(d)
    return out


def test_consistency_is_zero_for_exact_patches_and_grows_with_their_error():
    exact = _noisy_scan(0.0)
    assert len(exact) >= 50 and max(exact) < 1e-5  # offsets removed: exact patches agree
    means = [np.mean(_noisy_scan(s)) for s in (0.02, 0.05, 0.1, 0.2)]
    assert all(a < b for a, b in zip(means, means[1:]))
    # each patch's noise against a map that averages several: a little above the noise
    for s, m in zip((0.02, 0.05, 0.1, 0.2), means):
        assert s < m < 1.6 * s


def test_consistency_needs_an_overlap():
    pm = PhaseMap(128, 32, 0.01)
    patch = np.zeros((32, 32), np.float32)
    assert pm.disagreement(patch, 0.0, 0.0) is None  # an empty map
    pm.add(patch, 0.0, 0.0)
    assert pm.disagreement(patch, 0.3, 0.3) is None  # far from what the map holds
    assert pm.disagreement(patch, 5.0, 5.0) is None  # off the map
    assert pm.disagreement(patch + 1.0, 0.01, 0.0) == pytest.approx(0.0, abs=1e-6)


def test_surroundings_are_what_the_map_knows_nan_elsewhere():
    pm = PhaseMap(128, 32, 0.01)
    assert np.isnan(pm.surroundings(0.0, 0.0)).all()  # an empty map knows nothing
    assert pm.surroundings(5.0, 5.0) is None  # off the map
    pm.add(np.full((32, 32), 0.4, np.float32), 0.0, 0.0)
    around = pm.surroundings(0.1, 0.0)  # 10 px to the right: its left part is known
    known = np.isfinite(around)
    assert known[:, :8].any() and not known[:, -8:].any()
    np.testing.assert_allclose(around[known], 0.4, atol=1e-6)


# ---- ptychography: forward-model data residual -------------------------------------------
@pytest.fixture(scope="module")
def sim():
    return PtychoSimulator(Config().sim)


def test_sqrt_poisson_deviation_matches_sampling():
    rng = np.random.default_rng(0)
    for lam in (0.05, 0.5, 1.0, 4.0, 30.0, 400.0, 5000.0):
        n = rng.poisson(lam, 400_000)
        sampled = np.mean((np.sqrt(n) - np.sqrt(lam)) ** 2)
        got = float(sqrt_poisson_deviation(np.array([np.sqrt(lam)]))[0])
        assert got == pytest.approx(sampled, rel=0.03, abs=2e-3), lam


def _truth(sim, x, y):
    patch = sim.patch(x, y)
    return np.abs(patch).astype(np.float32), np.angle(patch).astype(np.float32)


def test_data_residual_is_near_zero_for_the_exact_object_at_any_flux(sim):
    residual = DataResidual(sim.probe)
    for x, y in [(0.0, 0.0), (0.3, -0.2), (-0.5, 0.4)]:
        amp, phase = _truth(sim, x, y)
        frame = sim.frame(x, y)
        # the object outside the lit region known (e.g. from the map): nothing left
        assert residual(frame, amp, phase, surround=phase) < 0.01
        assert residual(sim.frame(x, y, noise=False), amp, phase, phase) < 1e-3
        # 10^5 photons: the Poisson floor is removed, whatever the flux
        dim = np.random.default_rng(1).poisson(sim.frame(x, y, noise=False) * 0.1)
        assert residual(dim, amp, phase, phase) < 0.03
        # the phase offset and the amplitude's scale are not measurable: not counted
        assert residual(frame, 0.5 * amp, phase + 0.8, phase) < 0.01


def test_a_batch_of_residuals_is_each_frames_own(sim):
    residual = DataResidual(sim.probe)
    rng = np.random.default_rng(3)
    items = []
    for x, y in [(0.0, 0.0), (0.3, -0.2), (-0.5, 0.4)]:
        amp, phase = _truth(sim, x, y)
        noisy = phase + rng.normal(0, 0.1, phase.shape).astype(np.float32)
        items.append((sim.frame(x, y), amp, noisy, phase if x else None))
    items.insert(1, (np.ones((128, 128)), *items[0][1:]))  # another size: no residual
    one_by_one = [residual(*item) for item in items]
    assert one_by_one[1] is None and all(v > 0 for i, v in enumerate(one_by_one) if i != 1)
    batch = residual.batch(items)
    assert batch[1] is None
    assert [batch[i] for i in (0, 2, 3)] == pytest.approx([one_by_one[i] for i in (0, 2, 3)])
    assert residual.batch([]) == []


def test_data_residual_grows_with_the_phase_error(sim):
    residual = DataResidual(sim.probe)
    rng = np.random.default_rng(2)
    lit = residual.lit
    for x, y in [(0.1, 0.2), (-0.3, 0.1)]:
        amp, phase = _truth(sim, x, y)
        frame = sim.frame(x, y)
        figures = []
        for s in (0.02, 0.05, 0.1, 0.2):
            noisy = phase + np.where(lit, rng.normal(0, s, phase.shape), 0).astype(np.float32)
            figures.append(residual(frame, amp, noisy, phase))
        assert all(a < b for a, b in zip(figures, figures[1:])), figures
        # in radians: about the RMS phase error that was added (white noise)
        for s, f in zip((0.05, 0.1, 0.2), figures[1:]):
            assert 0.6 * s < f < 1.6 * s, (s, f)


def test_a_flat_prediction_does_not_look_perfect(sim):
    """An untrained network answers every frame with a near-featureless patch: it agrees
    with itself in the overlaps, but it does not explain the frames."""
    residual = DataResidual(sim.probe)
    for x, y in [(0.0, 0.0), (0.3, -0.2), (-0.5, 0.4)]:
        amp, phase = _truth(sim, x, y)
        frame = sim.frame(x, y)
        flat = residual(frame, np.full_like(amp, 0.5), np.zeros_like(phase))
        exact = residual(frame, amp, phase)  # nothing known around it: a floor remains
        assert flat > 0.06 and flat > 1.3 * exact, (flat, exact)


def test_data_residual_refuses_other_sizes_and_empty_frames(sim):
    residual = DataResidual(sim.probe)
    amp, phase = _truth(sim, 0.0, 0.0)
    assert residual(np.ones((128, 128)), amp, phase) is None
    assert residual(np.zeros((64, 64)), amp, phase) is None
    assert residual(sim.frame(0.0, 0.0), np.zeros_like(amp), phase) == residual.gain
    huge = np.full((64, 64), np.finfo(np.float32).max, np.float32)  # sums past float32's range
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert residual(huge, amp, phase) is None
    with pytest.raises(ValueError, match="even side"):
        DataResidual(np.ones((63, 63), np.complex64))


def test_probe_comes_from_a_file_when_configured(tmp_path, sim):
    path = tmp_path / "probe.npy"
    np.save(path, 3.0 * sim.probe)
    probe = load_probe(path)
    assert np.sum(np.abs(probe) ** 2) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(probe, sim.probe, atol=1e-6)
    s = Config().sim
    nominal = edge_probe("", s.frame_size, s.probe_radius_px, s.probe_defocus)
    np.testing.assert_allclose(nominal, sim.probe)
    np.testing.assert_allclose(
        edge_probe(str(path), s.frame_size, s.probe_radius_px, s.probe_defocus), probe
    )
    np.save(path, np.ones((4, 8)))
    with pytest.raises(ValueError, match="square"):
        load_probe(path)


def test_published_figure_combines_overlap_and_data():
    assert combine(None, None) is None
    assert combine(0.03, None) == pytest.approx(0.03)
    assert combine(None, 0.04) == pytest.approx(0.04)
    assert combine(0.03, 0.04) == pytest.approx(0.05)
    assert combine(0.0, 0.09) == pytest.approx(0.09)  # flat: agrees, explains nothing


# ---- HEDM: distance from the patch centroid ----------------------------------------------
def _gaussian_patches(centres, size=11, sigma=1.2, height=2000.0, background=20.0):
    idx = np.arange(size)
    out = []
    for x0, y0 in centres:
        gx = np.exp(-0.5 * ((idx - x0) / sigma) ** 2)
        gy = np.exp(-0.5 * ((idx - y0) / sigma) ** 2)
        out.append(background + height * gy[:, None] * gx[None, :])
    return np.array(out, np.float32)


def test_centroid_distance_is_the_centre_offset():
    truth = np.array([[5.0, 5.0], [4.6, 5.3], [5.7, 4.2]])
    patches = _gaussian_patches(truth)
    np.testing.assert_allclose(centroid_distance(patches, truth), 0.0, atol=0.02)
    shift = np.array([[0.5, 0.0], [0.0, -0.3], [0.3, 0.4]])
    np.testing.assert_allclose(
        centroid_distance(patches, truth + shift), np.hypot(*shift.T), atol=0.02
    )
    flat = np.full((1, 11, 11), 20.0, np.float32)
    assert np.isnan(centroid_distance(flat, np.array([[5.0, 5.0]])))[0]
    assert centroid_distance(np.zeros((0, 11, 11)), np.zeros((0, 2))).shape == (0,)


def test_locate_peaks_reports_each_centres_offset():
    """A frame of isolated peaks, a 'network' answering each centre 0.4 px off in x."""
    frame = np.full((96, 96), 20.0)
    yy, xx = np.mgrid[:96, :96]
    peaks = [(20.3, 30.6), (60.0, 50.2), (75.5, 20.4)]  # (x, y)
    for x0, y0 in peaks:
        frame += 3000 * np.exp(-0.5 * (((xx - x0) ** 2 + (yy - y0) ** 2) / 1.2**2))

    def infer(patches, offset=0.0):
        """Each patch's true centre (from the noise-free patch itself) + offset in x, in
        patch widths as BraggNN answers."""
        p = np.clip(patches - 20.0, 0, None)
        i, total = np.arange(11), p.sum((1, 2))
        return (np.stack([(p.sum(1) @ i) / total + offset, (p.sum(2) @ i) / total], 1) / 11,)

    found, patches, _ = locate_peaks(frame.astype(np.uint16), infer)
    assert len(found["x"]) == 3
    np.testing.assert_allclose(found["offset"], 0.0, atol=0.05)
    found, _, _ = locate_peaks(frame.astype(np.uint16), lambda p: infer(p, 0.4))
    np.testing.assert_allclose(found["offset"], 0.4, atol=0.05)


# ---- publishing: units and limits by mode ------------------------------------------------
def test_consistency_pvs_take_the_modes_units_and_limits():
    cfg = EdgeConfig()
    ptycho, hedm = consistency_scalars(cfg, "ptycho"), consistency_scalars(cfg, "hedm")
    assert ptycho["ScanConsistency"].units == "rad" and hedm["ScanConsistency"].units == "px"
    assert ptycho["ScanConsistency"].severity(cfg.consistency_warn_rad * 1.01) == 1
    assert hedm["ScanConsistency"].severity(cfg.consistency_alarm_px * 1.01) == 2
    assert hedm["ScanConsistency"].severity(cfg.consistency_warn_px * 0.99) == 0
    pvs = ScalarPVs(cfg, "ptycho")
    pvs.post("ScanConsistency", 0.2)
    assert pvs.pvs["ScanConsistency"].current().raw["alarm.severity"] == 2
    pvs.set_mode("hedm")
    now = pvs.pvs["ScanConsistency"].current().raw
    assert now["display.units"] == "px" and np.isnan(now["value"])
    assert now["alarm.severity"] == 0
    assert now["valueAlarm.highAlarmLimit"] == cfg.consistency_alarm_px
    pvs.post("ScanConsistency", 0.2)  # px: fine
    assert pvs.pvs["ScanConsistency"].current().raw["alarm.severity"] == 0
