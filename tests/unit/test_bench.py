"""``edgeloop bench``: its frames, its source files and one real case end to end (the edge,
pvapy's client and pvapy's streaming framework with edgeloop's processor)."""

import h5py
import hdf5plugin  # noqa: F401 (registers the bitshuffle filter for h5py)
import numpy as np
import pytest

from edgeloop.app import bench
from edgeloop.config import Config


def test_hedm_cases_light_about_the_peaks_they_name():
    cfg = Config()
    counts = {}
    for case in bench.CASES:
        if case.mode == "hedm":
            frames = bench.case_frames(case, cfg)
            rate, peaks = bench.inference_fps(cfg, "hedm", frames[:4], seconds=0.5)
            assert rate > 0
            counts[case.name] = peaks
    assert 15 <= counts["hedm512-20peaks"] <= 28, counts
    assert 40 <= counts["hedm512-50peaks"] <= 65, counts


def test_compressed_source_file_holds_the_frames(tmp_path):
    case = next(c for c in bench.CASES if c.codec == "bslz4")
    frames = np.random.default_rng(0).poisson(5, (3, 32, 32)).astype(np.int32)
    path = bench.write_source_file(case, frames, tmp_path)
    with h5py.File(path) as f:
        ds = f["entry/data"]
        assert "32008" in ds._filters  # bitshuffle: what pvapy-ad-sim-server sends as bslz4
        np.testing.assert_array_equal(ds[()], frames)


def test_table_reports_ratios():
    r = bench.Result("x", "8x8 int32", passthrough_fps=100, inference_fps=50, e2e_fps=40)
    r.pvapy_fps, r.pvapy_client_fps = 20.0, 125.0
    ratios = bench.ratios(r)
    assert ratios["e2e_over_ceiling"] == pytest.approx(0.8)
    assert ratios["e2e_over_pvapy"] == pytest.approx(2.0)
    assert ratios["passthrough_over_pvapy_client"] == pytest.approx(0.8)
    assert "0.80" in bench.table([r]) and "2.00" in bench.table([r])
