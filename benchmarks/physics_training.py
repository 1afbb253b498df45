"""PtychoNN's training variants at equal CPU time: which reaches the iterative reconstruction?

Simulates the continual demo's scans (``--scans`` regions of ``--points`` spiral points, as
``edgeloop demo --scans`` walks them) and one more scan, the evaluation scan the next model
serves.  The training scans are labelled as the retraining service labels them (ptychi,
cached under ``--out``); each variant then trains from scratch for the same CPU time
(``--seconds``, ``train.time_budget_s`` on the process clock, so a busy machine
shortchanges no variant; 240 s on the 2 threads of ``train.threads`` is about the two
minutes of wall time a retraining is aimed at) on the same frames:

- ``labels``: today's loss against ptychi's labels, plain decoder
- ``physics``: the forward model only (remote/physics.py), no labels; ``physics+overlap``
  with the overlap term (``train.overlap_weight`` 0.1)
- ``both``: labels + physics
- ``skip``: labels, U-Net decoder (``model.decoder = "skip"``); ``both+skip``,
  ``physics+skip``

Per variant, on the evaluation scan: the per-frame phase error against the simulator's
truth (offset removed, lit pixels), the error of the stitched map as the edge stitches it
(``PhaseMap``) cut at the scan's points, the ratio of that to ptychi's reconstruction of the
same scan, the inference cost per frame (torch, one thread, batches of 16), the epochs run;
a PNG of the maps beside the truth and ptychi's object.

    python benchmarks/physics_training.py [--seconds 240] [--scans 6] [--points 500]
        [--variants labels,physics,both,skip,both+skip] [--seed 0] [--out out/physics-bench]

(about 35 min the first time, most of it ptychi labelling the 7 scans; 2 min a variant
after that)
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

from edgeloop.app.continual_demo import centres, map_patches, patch_errors
from edgeloop.bluesky_plans.plans import spiral_positions
from edgeloop.config import Config
from edgeloop.edge_pva.stitch import PhaseMap
from edgeloop.ioc.physics import PtychoSimulator
from edgeloop.models import count_parameters
from edgeloop.models import kind as model_kind
from edgeloop.registry import sha256_bytes
from edgeloop.remote import tasks
from edgeloop.remote.held_out import read_training_set
from edgeloop.remote.pipeline import analysis_request
from edgeloop.remote.training import train
from edgeloop.scanfile import write_scan

VARIANTS = {  # name: (train settings, model settings)
    "labels": ({"loss": "labels"}, {"decoder": "plain"}),
    "physics": ({"loss": "physics"}, {"decoder": "plain"}),
    "physics+overlap": ({"loss": "physics", "overlap_weight": 0.1}, {"decoder": "plain"}),
    "both": ({"loss": "both"}, {"decoder": "plain"}),
    "skip": ({"loss": "labels"}, {"decoder": "skip"}),
    "both+skip": ({"loss": "both"}, {"decoder": "skip"}),
    "physics+skip": ({"loss": "physics"}, {"decoder": "skip"}),
}


def simulate(cfg: Config, sim, out: Path, n_scans: int, points: int, step: float) -> list[Path]:
    """The training scans and, last, the evaluation scan (a new region), as scan files."""
    paths = []
    for i, centre in enumerate(centres(n_scans + 1)):
        path = out / f"scan_{i:02d}_{points}pt.h5"
        if not path.exists():
            pos = spiral_positions(points, step, centre)
            frames = np.stack([sim.frame(x, y) for x, y in pos])
            write_scan(path, "ptychography", frames, pos, uid=f"bench-{i}")
        paths.append(path)
    return paths


def infer(model, frames: np.ndarray, size: int, batch: int = 16) -> tuple[np.ndarray, float]:
    """Phase predictions of ``frames`` and the seconds per frame (one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x = model_kind("ptychonn").preprocess(list(frames), size)
    out = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(x), batch):
            out.append(model(torch.from_numpy(x[start : start + batch]))[1][:, 0].numpy())
    seconds = (time.perf_counter() - t0) / len(x)
    torch.set_num_threads(threads)
    return np.concatenate(out), seconds


def stitched(cfg: Config, phases: np.ndarray, positions) -> np.ndarray:
    pmap = PhaseMap(cfg.edge.map_size, cfg.model.input_size, cfg.sim.pixel_um)
    for ph, (x, y) in zip(phases, positions, strict=True):
        pmap.add(ph, x, y)
    return pmap.image()


def run_variant(cfg: Config, name: str, files: dict, seconds: float, epochs: int) -> dict:
    train_settings, model_settings = VARIANTS[name]
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(
            cfg.train, **train_settings, time_budget_s=seconds, epochs=epochs
        ),
        model=dataclasses.replace(cfg.model, **model_settings),
    )
    path = files["frames"] if cfg.train.loss == "physics" else files["labels"]
    inputs, targets, loss_fn = read_training_set(
        path, sha256_bytes(Path(path).read_bytes()), "ptychonn", cfg.train
    )
    torch.manual_seed(cfg.train.seed)
    model = model_kind("ptychonn").build(**cfg.arch("ptychonn"))
    t0, cpu0 = time.perf_counter(), time.process_time()
    model, objective, history = train(
        model, inputs, targets, loss_fn, cfg.train, clock=time.process_time
    )
    return {
        "model": model,
        "train_s": time.perf_counter() - t0,
        "train_cpu_s": time.process_time() - cpu0,
        "epochs": len(history),
        "objective": objective,
        "parameters": count_parameters(model),
    }


def evaluate(cfg: Config, sim, model, scan_path: Path) -> dict:
    from edgeloop.scanfile import read_scan

    scan = read_scan(scan_path)
    positions = scan["positions_um"]
    phases, per_frame_s = infer(model, scan["frames"], cfg.model.input_size)
    phase_map = stitched(cfg, phases, positions)
    return {
        "frame_error": float(patch_errors(phases, positions, sim).mean()),
        "map_error": float(
            patch_errors(map_patches(phase_map, positions, cfg), positions, sim).mean()
        ),
        "ms_per_frame": 1e3 * per_frame_s,
        "map": phase_map,
    }


def reference(cfg: Config, sim, scan_path: Path, cache: Path) -> dict:
    """ptychi's reconstruction of the evaluation scan, labelled as the service labels it."""
    from edgeloop.scanfile import read_scan

    _, request = analysis_request(cfg, "ptychonn", [str(scan_path)])
    request["cache_dir"] = str(cache)
    labels = tasks.scan_labels(scan_path, request)
    positions = read_scan(scan_path)["positions_um"]
    return {
        "frame_error": float(patch_errors(labels["phase"], positions, sim).mean()),
        "map": stitched(cfg, labels["phase"], positions),
    }


def picture(path: Path, cfg: Config, sim, maps: list[tuple[str, np.ndarray]], scan_path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgeloop.scanfile import read_scan

    pos = read_scan(scan_path)["positions_um"]
    n, m = cfg.edge.map_size, cfg.model.input_size
    c = n // 2
    lo_xy, hi_xy = pos.min(0), pos.max(0)
    r0 = int(c + lo_xy[1] / cfg.sim.pixel_um) - m // 4
    r1 = int(c + hi_xy[1] / cfg.sim.pixel_um) + m // 4
    c0 = int(c + lo_xy[0] / cfg.sim.pixel_um) - m // 4
    c1 = int(c + hi_xy[0] / cfg.sim.pixel_um) + m // 4
    half = cfg.sim.object_size // 2 - n // 2
    truth = np.angle(sim.obj)[half + r0 : half + r1, half + c0 : half + c1]
    truth = truth - truth.mean()
    lo, hi = np.percentile(truth, [1, 99])
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(3.2 * (len(maps) + 1), 3.6))
    axes[0].imshow(truth, cmap="gray", vmin=lo, vmax=hi)
    axes[0].set_title("truth")
    for ax, (title, img) in zip(axes[1:], maps, strict=True):
        crop = img[r0:r1, c0:c1]
        seen = crop != 0
        offset = (crop[seen] - truth[seen]).mean() if seen.any() else 0.0
        ax.imshow(np.where(seen, crop - offset, np.nan), cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=240.0, help="training CPU time per variant")
    ap.add_argument("--epochs", type=int, default=1000, help="epoch cap (the time binds first)")
    ap.add_argument("--scans", type=int, default=6)
    ap.add_argument("--points", type=int, default=500)
    ap.add_argument("--step", type=float, default=0.05, help="um between spiral points")
    ap.add_argument("--variants", default="labels,physics,both,skip,both+skip")
    ap.add_argument("--seed", type=int, default=0, help="initial weights and batch order")
    ap.add_argument("--out", default="out/physics-bench")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = Config.from_dict({"registry_dir": str(out / "registry"), "train": {"seed": args.seed}})
    sim = PtychoSimulator(cfg.sim)
    t0 = time.perf_counter()
    *train_scans, eval_scan = simulate(cfg, sim, out, args.scans, args.points, args.step)
    _, request = analysis_request(cfg, "ptychonn", [str(p) for p in train_scans])
    request["cache_dir"] = str(out / "labels_cache")
    files = {
        "labels": tasks.analyze(dict(request, out=str(out / "labels.h5")))["labels"],
        "frames": tasks.prepare_frames(dict(request, out=str(out / "frames.h5")))["frames"],
    }
    ref = reference(cfg, sim, eval_scan, out / "labels_cache")
    print(
        f"scans simulated and labelled in {time.perf_counter() - t0:.0f} s; "
        f"ptychi's error on the evaluation scan {ref['frame_error']:.4f} rad"
    )
    rows, maps = [], [("ptychi", ref["map"])]
    for name in filter(None, args.variants.split(",")):
        trained = run_variant(cfg, name, files, args.seconds, args.epochs)
        figures = evaluate(cfg, sim, trained["model"], eval_scan)
        maps.append((f"{name}: {figures['map_error']:.3f}", figures.pop("map")))
        row = {"variant": name, **{k: v for k, v in trained.items() if k != "model"}, **figures}
        row["map_ratio"] = figures["map_error"] / ref["frame_error"]
        rows.append(row)
        print(
            f"{name:>15}: {row['epochs']:3d} epochs in {row['train_cpu_s']:4.0f} s CPU "
            f"({row['train_s']:4.0f} s wall), "
            f"frame error {row['frame_error']:.4f}, map error {row['map_error']:.4f} "
            f"({row['map_ratio']:.2f}x ptychi), {row['ms_per_frame']:.2f} ms/frame, "
            f"{row['parameters']} parameters",
            flush=True,
        )
    picture(out / f"maps_seed{args.seed}.png", cfg, sim, maps, eval_scan)
    (out / f"results_seed{args.seed}.json").write_text(
        json.dumps(
            {"ptychi_error": ref["frame_error"], "args": vars(args), "rows": rows}, indent=1
        )
    )
    print(
        f"maps: {out / f'maps_seed{args.seed}.png'}; figures: {out}/results_seed{args.seed}.json"
    )


if __name__ == "__main__":
    main()
