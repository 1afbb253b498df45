"""Labels for PtychoNN from conventional iterative phase retrieval (ptychi, on CPU).

The scan's diffraction patterns and positions are reconstructed together; each frame's
label is the reconstructed object patch it saw (amplitude and phase), cut at the frame's
fractional position exactly as the simulator cuts it.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np

from edgeloop.optics import extract_patch

log = logging.getLogger(__name__)


def _options(algorithm: str, epochs: int, n: int, origin: np.ndarray):
    """ptychi's options for a far-field CPU reconstruction of n frames, the object's
    origin given (so that labels are cut where the simulator cuts), positions fixed."""
    import ptychi.api as api

    alg = algorithm.upper()
    if alg == "LSQML":
        opts = api.LSQMLOptions()
        batch = 50
    elif alg in ("RPIE", "EPIE"):
        # plain PIEOptions fails in ptychi 2.2.0 with a refined probe and batch > 1
        opts = api.RPIEOptions() if alg == "RPIE" else api.EPIEOptions()
        alpha = 0.1 if alg == "RPIE" else 1.0  # rPIE: regularisation; ePIE: step size
        opts.object_options.alpha = opts.probe_options.alpha = alpha
        batch = 10
    else:
        raise ValueError(f"unknown phase-retrieval algorithm {algorithm!r} (LSQML, rPIE, ePIE)")
    opts.data_options.fft_shift = True  # detector data: zero frequency at the centre
    opts.data_options.free_space_propagation_distance_m = math.inf
    ro = opts.reconstructor_options
    ro.default_device = api.Devices.CPU
    ro.default_dtype = api.Dtypes.FLOAT32
    ro.num_epochs = epochs
    ro.batch_size = min(batch, n)
    ro.random_seed = 0
    oo = opts.object_options
    oo.optimizable = True
    oo.pixel_size_m = 1.0
    oo.determine_position_origin_coords_by = api.ObjectPosOriginCoordsMethods.SPECIFIED
    oo.position_origin_coords = [float(origin[0]), float(origin[1])]
    opts.probe_options.optimizable = True
    opts.probe_options.optimization_plan.start = 1
    opts.probe_position_options.optimizable = False
    opts.opr_mode_weight_options.optimizable = False

    return opts


def reconstruct(
    intensities: np.ndarray,
    positions_px: np.ndarray,
    probe: np.ndarray,
    epochs: int = 30,
    algorithm: str = "LSQML",
    threads: int = 2,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ptychi; returns (object, probe, origin) with the patch centre of position p at
    ``p + origin`` in the object array.

    intensities: (N, M, M), zero frequency at the centre (as the detector sees it);
    positions_px: (N, 2) (row, col) in object pixels; probe: (M, M) complex initial guess.
    """
    import torch
    from ptychi.api.task import PtychographyTask
    from ptychi.utils import rescale_probe

    torch.set_num_threads(threads)
    logging.getLogger("ptychi").setLevel(logging.WARNING)
    intensities = np.asarray(intensities, np.float32)
    pos = np.asarray(positions_px, np.float64)
    n, m, _ = intensities.shape
    pad = 4
    pmin = np.floor(pos.min(0))
    span = np.ceil(pos.max(0) - pmin)
    obj_shape = tuple(int(s) + m + 2 * pad for s in span)
    origin = (m - 1) / 2.0 + pad - pmin

    opts = _options(algorithm, epochs, n, origin)
    p0 = rescale_probe(np.asarray(probe, np.complex64)[None, None], intensities)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        with PtychographyTask(
            opts,
            diffraction_data=intensities,
            object_data=np.ones((1, *obj_shape), np.complex64),
            probe_data=p0.astype(np.complex64),
            probe_position_y_px=pos[:, 0].astype(np.float32),
            probe_position_x_px=pos[:, 1].astype(np.float32),
        ) as task:
            task.run()
            obj = task.get_data_to_cpu("object", as_numpy=True)[0]
            prb = task.get_data_to_cpu("probe", as_numpy=True)[0, 0]
            used = task.object.pos_origin_coords.detach().cpu().numpy().astype(np.float64)
    return obj, prb, used


def label_patches(
    obj: np.ndarray, origin: np.ndarray, positions_px: np.ndarray, size: int, probe: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(amplitude, phase) label patches, (N, size, size) each.

    The global phase of a reconstruction is arbitrary: it is set so the illuminated part of
    the object has zero mean phase; amplitude is scaled so its 99th percentile is 1.
    """
    coverage = np.zeros(obj.shape, np.float32)
    power = (np.abs(probe) ** 2).astype(np.float32)
    tops = positions_px + origin - (size - 1) / 2
    for ty, tx in np.round(tops).astype(int):
        coverage[ty : ty + size, tx : tx + size] += power
    lit = coverage > 0.1 * coverage.max()
    obj = obj * np.exp(-1j * np.angle(obj[lit].sum()))
    scale = np.percentile(np.abs(obj[lit]), 99)
    patches = np.stack([extract_patch(obj, ty, tx, size) for ty, tx in tops])
    amplitude = np.clip(np.abs(patches) / scale, 0, 1).astype(np.float32)
    return amplitude, np.angle(patches).astype(np.float32)


def positions_px(positions_um: np.ndarray, pixel_um: float) -> np.ndarray:
    """Stage positions (x, y) in um -> object (row, col) in pixels."""
    positions_um = np.asarray(positions_um, np.float64)
    return np.stack([positions_um[:, 1], positions_um[:, 0]], axis=1) / pixel_um


def make_labels(
    frames: np.ndarray,
    positions_um: np.ndarray,
    pixel_um: float,
    probe: np.ndarray,
    epochs: int,
    algorithm: str,
    threads: int = 2,
    recon: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels for one scan: positions (x, y) in um -> (row, col) px, reconstruct, cut.
    A ``recon`` dict receives the reconstruction: object, probe, origin, positions_px."""
    if len(frames) < 4:
        raise ValueError(f"phase retrieval needs several overlapping frames, got {len(frames)}")
    m = frames.shape[-1]
    if probe.shape != (m, m):
        raise ValueError(f"probe {probe.shape} does not match frames {frames.shape[1:]}")
    pos_px = positions_px(positions_um, pixel_um)
    obj, prb, origin = reconstruct(frames, pos_px, probe, epochs, algorithm, threads)
    if recon is not None:
        recon.update(object=obj, probe=prb, origin=origin, positions_px=pos_px)
    return label_patches(obj, origin, pos_px, m, prb)


__all__ = ["reconstruct", "label_patches", "make_labels", "positions_px"]
