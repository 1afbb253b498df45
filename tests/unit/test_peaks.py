"""Peak finder, patch cropping at borders, and the BraggNN network's shape."""

import numpy as np
import pytest
import torch

from edgeloop.models import BraggNN, braggnn_preprocess, count_parameters, kind
from edgeloop.peaks import crop_patches, find_peaks


def gaussian_frame(centres, shape=(128, 128), height=1000.0, sigma=1.2, background=20, seed=0):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.full(shape, float(background))
    for y, x in centres:
        img += height * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma**2))
    counts = np.random.default_rng(seed).poisson(img)
    return np.minimum(counts, 65535).astype(np.uint16)  # a 16-bit detector clips


def test_finds_each_isolated_peak_near_its_centre():
    centres = [(20.3, 30.6), (64.0, 64.4), (100.7, 90.2)]
    peaks = find_peaks(gaussian_frame(centres))
    assert len(peaks) == 3
    found = sorted(zip(peaks.rows, peaks.cols))
    for (r, c), (y, x) in zip(found, sorted(centres)):
        assert abs(r - y) <= 1 and abs(c - x) <= 1
    assert np.all(peaks.intensity > 0) and not peaks.saturated.any()


def test_no_peaks_gives_an_empty_result():
    frame = np.random.default_rng(1).poisson(20, (64, 64)).astype(np.uint16)
    peaks = find_peaks(frame)
    assert len(peaks) == 0
    patches, tops = crop_patches(frame, peaks)
    assert patches.shape == (0, 11, 11) and tops.shape == (0, 2)


def test_overlapping_peaks_are_separate_candidates():
    peaks = find_peaks(gaussian_frame([(40, 40), (40, 45)], sigma=1.5))
    assert len(peaks) == 2


def test_saturated_peak_is_flagged():
    frame = gaussian_frame([(30, 30)], height=1e6)
    assert (frame == 65535).sum() > 5  # a flat top of clipped pixels
    peaks = find_peaks(frame)
    assert len(peaks) == 1 and peaks.saturated[0]


def test_border_patches_are_padded_and_flagged():
    frame = gaussian_frame([(2, 60), (64, 64), (120, 126)])
    peaks = find_peaks(frame)
    patches, tops = crop_patches(frame, peaks, size=11)
    assert patches.shape == (3, 11, 11)
    order = np.argsort(peaks.rows)
    assert list(peaks.border[order]) == [True, False, True]
    centre = order[1]
    r, c = tops[centre]
    np.testing.assert_array_equal(patches[centre], frame[r : r + 11, c : c + 11])
    for i in range(3):  # every patch has its maximum at the centre pixel
        assert np.unravel_index(patches[i].argmax(), (11, 11)) == (5, 5)
    with pytest.raises(ValueError):
        crop_patches(frame, peaks, size=10)


def test_braggnn_shape_parameters_and_preprocessing():
    model = BraggNN().eval()
    assert 40_000 < count_parameters(model) < 50_000
    x = braggnn_preprocess([np.random.rand(11, 11) * 100 for _ in range(5)], 11)
    assert x.shape == (5, 1, 11, 11) and x.min() == 0 and x.max() == pytest.approx(1)
    with torch.no_grad():
        (centre,) = model(torch.from_numpy(x))
    assert centre.shape == (5, 2)
    assert kind("braggnn").outputs == ("center",)
    with pytest.raises(ValueError):
        braggnn_preprocess([np.zeros((9, 9))], 11)
    with pytest.raises(ValueError):
        BraggNN(patch=5)
