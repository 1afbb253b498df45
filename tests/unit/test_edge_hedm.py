"""HEDM at the edge without servers: simulated frames -> peaks -> BraggNN -> NTTable."""

import numpy as np
import pytest
import torch

from edgeloop.config import TrainConfig
from edgeloop.edge_pva.hedm import locate_peaks
from edgeloop.edge_pva.inference import ServedModel, TorchBackend
from edgeloop.ioc.hedm import HedmConfig, HedmSimulator, make_patch_dataset
from edgeloop.models import BraggNN, braggnn_preprocess, kind
from edgeloop.remote.peakfit import fit_patches
from edgeloop.remote.training import centre_loss, train

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def braggnn():
    """BraggNN trained as the loop trains it: on pseudo-Voigt fit labels; served as the edge
    serves it."""
    patches, _ = make_patch_dataset(1500, 11, seed=5)
    labels, ok = fit_patches(patches)
    torch.manual_seed(0)
    model, _, _ = train(
        BraggNN(11),
        braggnn_preprocess(patches[ok], 11),
        (labels[ok] / 11,),
        centre_loss,
        TrainConfig(epochs=12, batch_size=64, lr=2e-3, lr_min=2e-4),
    )
    return ServedModel(1, kind("braggnn"), 11, TorchBackend(model)).infer


def test_frame_peaks_match_the_simulators_truth(braggnn):
    sim = HedmSimulator(HedmConfig())
    errors, found, lit = [], 0, 0
    for omega in (10.0, 95.5, 200.25):
        frame, truth = sim.frame(omega)
        peaks, patches, _ = locate_peaks(frame, braggnn)
        assert patches.shape == (len(peaks["x"]), 11, 11)
        strong = truth[(truth["height"] > 300) & ~truth["saturated"]]
        lit += len(strong)
        for t in strong:
            d = np.hypot(peaks["x"] - t["x"], peaks["y"] - t["y"])
            others = np.hypot(strong["x"] - t["x"], strong["y"] - t["y"])
            if len(d) and d.min() < 2.0:
                found += 1
                isolated = np.sort(others)[1] > 8 if len(strong) > 1 else True
                inside = 6 <= t["x"] <= frame.shape[1] - 7 and 6 <= t["y"] <= frame.shape[0] - 7
                if isolated and inside:
                    errors.append(d.min())
    assert found >= 0.9 * lit, (found, lit)
    assert len(errors) > 10 and np.mean(errors) < 0.3, np.mean(errors)
