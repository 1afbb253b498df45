"""The 20 real APS frames: PtychoNN's phase against ptychi's reconstruction of the same frames.

``../shared/data/aps-ptycho-test235.npz`` holds 20 far-field patterns (512x512 photon
counts) and their stage positions (y, x in metres), without labels or probe. Their
geometry, from the repository that published them (mdw771/probe_position_correction_w_ptychonn):
8.8 keV, detector 2.2 m from the sample, 75 um pixels, so an object pixel of
lambda z / (512 x 75 um) = 8.07 nm. The edge sum-bins a 512-pixel frame to the model's 64
(``to_input_size``): binning keeps that object pixel and narrows the field of view to 64
pixels (0.52 um); the points are about 17 pixels apart.

1. ptychi reconstructs object and probe from the binned frames (LSQML). No probe was
   published: it starts from the measured pupil (the mean pattern's bright region, a zone
   plate's annulus here) with a quadratic phase, the defocus the one of :data:`DEFOCI`
   after which ptychi's amplitude R-factor against the data is lowest.
2. The served model (the latest accepted PtychoNN of ``--registry``, e.g. the continual
   demo's) answers every frame as the edge does.
3. Per frame, the network's phase against ptychi's patch of the same point (lit pixels,
   offset removed): the mean |difference|, the correlation, and the R-factor of the
   network's object through ptychi's probe; the stitched maps side by side in a PNG.
4. With ``--adapt-seconds`` the model is also tuned on the frames alone (``train.loss =
   "physics"``, ptychi's probe, no labels; the loss a retraining can run before labels
   exist) and compared again.

    python benchmarks/aps_frames.py --registry out/demo/models [--epochs 200]
        [--adapt-seconds 60] [--out out/aps-frames]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from edgeloop.config import Config
from edgeloop.edge_pva.stitch import PhaseMap
from edgeloop.models import kind as model_kind
from edgeloop.models import to_input_size
from edgeloop.optics import centring_sign, extract_patch, illuminated_mask, make_probe
from edgeloop.registry import Registry
from edgeloop.remote.labels import label_patches, reconstruct
from edgeloop.remote.physics import amplitude_error, far_field, training_set
from edgeloop.remote.training import train

APS = Path(__file__).resolve().parents[2] / "shared" / "data" / "aps-ptycho-test235.npz"
ENERGY_KEV, DISTANCE_M, DETECTOR_PIXEL_M = 8.8, 2.2, 75e-6
DEFOCI = (0.0, 4.0, 8.0, 12.0, 16.0, 24.0)  # radians at the pupil's edge, tried by ptychi


def object_pixel_m(frame_side: int) -> float:
    wavelength = 12.398e-10 / ENERGY_KEV
    return wavelength * DISTANCE_M / (frame_side * DETECTOR_PIXEL_M)


def pupil(intensities: np.ndarray, edge_fraction: float = 0.01) -> tuple[np.ndarray, float]:
    """The measured pupil: the mean modulus where the mean pattern is above
    ``edge_fraction`` of its peak (here a zone plate's bright annulus around its central
    stop), and its outer radius in pixels."""
    mean = np.clip(intensities, 0, None).mean(0)
    n = mean.shape[0]
    k = np.hypot(*np.meshgrid(np.arange(n) - n // 2, np.arange(n) - n // 2, indexing="ij"))
    bright = mean > edge_fraction * mean.max()
    return np.where(bright, np.sqrt(mean), 0.0), float(k[bright].max())


def r_factor(amplitude: np.ndarray, phase: np.ndarray, probe: np.ndarray, inputs: np.ndarray):
    """(n,) amplitude R-factor of objects (n, M, M) through the probe against the measured
    moduli (the model's normalised inputs)."""
    shifted = torch.from_numpy(probe * centring_sign(probe.shape[0]))
    with torch.no_grad():
        predicted = far_field(shifted, torch.from_numpy(amplitude), torch.from_numpy(phase))
        return amplitude_error(predicted, torch.from_numpy(inputs[:, 0])).numpy()


def compare(phase: np.ndarray, reference: np.ndarray, lit: np.ndarray) -> dict:
    """Per frame on the lit pixels, each frame's offset removed: mean |difference|,
    Pearson correlation, and the reference's own spread (the scale the error is read on)."""
    errors, corrs, spreads = [], [], []
    for p, r in zip(phase, reference, strict=True):
        a, b = p[lit] - p[lit].mean(), r[lit] - r[lit].mean()
        errors.append(np.abs(a - b).mean())
        corrs.append(float(np.corrcoef(a, b)[0, 1]))
        spreads.append(np.abs(b).mean())
    return {
        "phase_error": float(np.mean(errors)),
        "correlation": float(np.mean(corrs)),
        "reference_spread": float(np.mean(spreads)),
    }


def phase_retrieval(intensities, positions_px, probe, inputs, epochs: int) -> dict:
    """ptychi's object and probe from the frames, and its R-factor per frame."""
    t0 = time.perf_counter()
    obj, probe, origin = reconstruct(intensities, positions_px, probe, epochs=epochs)
    seconds = time.perf_counter() - t0
    size = probe.shape[0]
    tops = positions_px + origin - (size - 1) / 2
    patches = np.stack([extract_patch(obj, ty, tx, size) for ty, tx in tops])
    r = r_factor(
        np.abs(patches).astype(np.float32), np.angle(patches).astype(np.float32), probe, inputs
    )
    return {"object": obj, "probe": probe, "origin": origin, "r": r, "seconds": seconds}


def served_model(registry: Path):
    reg = Registry(registry)
    version = reg.accepted("ptychonn")
    if version is None:
        raise SystemExit(f"{registry} holds no accepted PtychoNN (run make demo first)")
    model, _ = reg.load(version)
    return model.eval(), version


def infer(model, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        amplitude, phase = model(torch.from_numpy(inputs))
    return amplitude[:, 0].numpy(), phase[:, 0].numpy()


def adapt(cfg: Config, model, inputs, positions_px, probe, seconds: float):
    """Tune the model on the frames alone for ``seconds`` of CPU: the physics loss through
    ptychi's probe, the best epoch on the held-out fifth kept."""
    tc = dataclasses.replace(
        cfg.train,
        loss="physics",
        time_budget_s=seconds,
        epochs=100_000,  # the time budget ends it
        sample_budget=0,
        keep_initial=True,
        val_fraction=0.2,
    )
    one_scan = np.zeros(len(inputs), int)
    inputs, targets, loss = training_set(inputs, positions_px, one_scan, probe, tc)
    model.train()
    tuned, objective, history = train(model, inputs, targets, loss, tc, clock=time.process_time)
    return tuned.eval(), objective, len(history)


def stitched(phases: np.ndarray, positions_px: np.ndarray, size: int, pixel_um: float):
    centre = positions_px.mean(0)
    span = int(np.ceil(np.ptp(positions_px, 0).max())) + size + 8
    pmap = PhaseMap(span, size, pixel_um)
    for ph, (row, col) in zip(phases, positions_px - centre, strict=True):
        pmap.add(ph, col * pixel_um, row * pixel_um)
    return pmap.image()


def picture(path: Path, maps: list[tuple[str, np.ndarray]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(maps), figsize=(3.4 * len(maps), 3.6))
    for ax, (title, img) in zip(axes, maps, strict=True):
        seen = img != 0
        shown = np.where(seen, img - img[seen].mean(), np.nan)
        lo, hi = np.nanpercentile(shown, [1, 99])
        ax.imshow(shown, cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--registry", type=Path, default=Path("out/demo/models"))
    ap.add_argument("--config", type=Path, help="the configuration the model was trained with")
    ap.add_argument("--data", type=Path, default=APS)
    ap.add_argument("--epochs", type=int, default=200, help="ptychi's epochs")
    ap.add_argument("--search-epochs", type=int, default=40, help="per defocus tried")
    ap.add_argument("--adapt-seconds", type=float, default=0.0)
    ap.add_argument("--out", type=Path, default=Path("out/aps-frames"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = Config.load(args.config)
    size = cfg.model.input_size
    args.out.mkdir(parents=True, exist_ok=True)

    data = np.load(args.data)
    counts, positions_m = data["reciprocal"], data["position"]
    pixel_m = object_pixel_m(counts.shape[-1])
    intensities = np.stack([to_input_size(f, size) for f in counts])
    positions_px = positions_m / pixel_m  # (y, x) metres -> (row, col) pixels
    inputs = model_kind("ptychonn").preprocess(list(counts), size)
    step = np.sort(np.hypot(*(positions_px[:, None] - positions_px[None]).transpose(2, 0, 1)))
    print(
        f"{len(counts)} frames {counts.shape[1]}x{counts.shape[2]} -> {size}x{size}; object "
        f"pixel {pixel_m * 1e9:.2f} nm; nearest neighbour {np.median(step[:, 1]):.1f} px"
    )

    modulus, radius = pupil(intensities)
    scores = {}
    for defocus in DEFOCI:
        probe = make_probe(size, radius, defocus, modulus)
        fit = phase_retrieval(intensities, positions_px, probe, inputs, args.search_epochs)
        scores[defocus] = fit["r"].mean()
        print(
            f"  defocus {defocus:4.0f} rad: R-factor {scores[defocus]:.3f} "
            f"after {args.search_epochs} epochs"
        )
    defocus = min(scores, key=scores.get)
    fit = phase_retrieval(
        intensities, positions_px, make_probe(size, radius, defocus, modulus), inputs, args.epochs
    )
    obj, probe, origin, ptychi_r = fit["object"], fit["probe"], fit["origin"], fit["r"]
    lit = illuminated_mask(probe)
    _, ref_phase = label_patches(obj, origin, positions_px, size, probe)
    print(
        f"ptychi: pupil radius {radius:.0f} px, defocus {defocus:.0f} rad, {args.epochs} "
        f"epochs in {fit['seconds']:.1f} s; R-factor {ptychi_r.mean():.3f}; lit pixels "
        f"{int(lit.sum())} of {size * size}"
    )

    model, version = served_model(args.registry)
    rows = {}
    amp, phase = infer(model, inputs)
    rows[f"served v{version}"] = dict(
        compare(phase, ref_phase, lit), r_factor=float(r_factor(amp, phase, probe, inputs).mean())
    )
    maps = [("ptychi", stitched(ref_phase, positions_px, size, pixel_m * 1e6))]
    maps.append((f"PtychoNN v{version}", stitched(phase, positions_px, size, pixel_m * 1e6)))
    if args.adapt_seconds > 0:
        tuned, _, epochs = adapt(cfg, model, inputs, positions_px, probe, args.adapt_seconds)
        amp, phase = infer(tuned, inputs)
        rows[f"physics {epochs} ep"] = dict(
            compare(phase, ref_phase, lit),
            r_factor=float(r_factor(amp, phase, probe, inputs).mean()),
            epochs=epochs,
            seconds=args.adapt_seconds,
        )
        maps.append(("physics-tuned", stitched(phase, positions_px, size, pixel_m * 1e6)))
    rows["ptychi"] = {
        "r_factor": float(ptychi_r.mean()),
        "seconds": fit["seconds"],
        "defocus": defocus,
    }

    spread = next(iter(rows.values()))["reference_spread"]
    print(f"against ptychi (whose phase departs {spread:.3f} rad from its mean, lit pixels):")
    print(f"{'':16} {'|d phase|':>10} {'corr':>6} {'R-factor':>9}")
    for name, row in rows.items():
        err, corr = row.get("phase_error", np.nan), row.get("correlation", np.nan)
        print(f"{name:16} {err:10.3f} {corr:6.2f} {row['r_factor']:9.3f}")
    picture(args.out / "aps_maps.png", maps)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out / 'aps_maps.png'} and results.json")


if __name__ == "__main__":
    main()
