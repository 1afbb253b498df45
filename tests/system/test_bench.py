"""``edgeloop bench``: its frames, its source files and one real case end to end (the edge,
pvapy's client and pvapy's streaming framework with edgeloop's processor)."""

import json

import hdf5plugin  # noqa: F401 (registers the bitshuffle filter for h5py)
import pytest

from edgeloop.app import bench
from edgeloop.config import Config


@pytest.mark.timeout(300)
def test_bench_one_case_end_to_end(tmp_path):
    report = bench.run(tmp_path, Config(), cases=["ptycho64"], seconds=1.5)
    saved = json.loads((tmp_path / "bench.json").read_text())
    (case,) = saved["cases"]
    assert case == report["cases"][0]
    for key in ("passthrough_fps", "inference_fps", "e2e_fps", "pvapy_fps"):
        assert case[key] and case[key] > 0, (key, case)
    # pvapy's client now and then never connects to a source publishing at full speed: the
    # bench says so in the case's notes instead of a figure
    assert case["pvapy_client_fps"] or "pvapy client failed" in " ".join(case["notes"])
    assert case["rss_mb"] > 50
    assert case["latency_ms_p50"] <= case["latency_ms_p99"]
    assert case["dropped"] >= 0 and case["dropped_saturated"] >= 0
    assert all(n.startswith("pvapy client failed") for n in case["notes"]), case["notes"]
