"""`edgeloop hedm-accuracy`: BraggNN trained on fit labels, scored against the truth."""

import json

import numpy as np
import pytest

from edgeloop.app.cli import main
from edgeloop.ioc.hedm import make_patch_dataset

pytestmark = pytest.mark.timeout(300)
KEYS = {
    "n_peaks",
    "braggnn_error_px_mean",
    "braggnn_error_px_p95",
    "fit_error_px_mean",
    "fit_error_px_p95",
    "braggnn_us_per_peak",
    "fit_us_per_peak",
}


def test_accuracy_report_is_written_and_braggnn_beats_guessing(tmp_path, capsys):
    main(
        [
            "hedm-accuracy",
            "--out",
            str(tmp_path),
            "--train-peaks",
            "800",
            "--test-peaks",
            "150",
            "--epochs",
            "8",
        ]
    )
    report = json.loads((tmp_path / "accuracy.json").read_text())
    assert KEYS <= set(report) and report["n_peaks"] == 150
    # guessing the patch centre: the truth is uniform within +-1.5 px of it
    _, truth = make_patch_dataset(150, 11, seed=202)
    guess = np.linalg.norm(truth - 5.0, axis=1).mean()
    assert report["braggnn_error_px_mean"] < 0.6 * guess
    assert report["fit_error_px_mean"] < 0.1
    assert report["braggnn_us_per_peak"] < report["fit_us_per_peak"]
    assert "BraggNN" in capsys.readouterr().out
