"""Does the edge's label-free quality figure follow the true error, across frames and models?

Simulates a spiral scan and runs each PtychoNN on its frames as the edge does, stitching the
answers in scan order.  Per frame it records the figures the edge can compute without labels
(``overlap``: disagreement with the map so far, ``PhaseMap.disagreement``; ``data``: the
forward-model residual against the frame itself, ``DataResidual``; ``published``: what
``edge:Consistency`` carries, ``edge_pva.label_free.combine`` of the two) beside the true phase
error against the simulator's object.  Prints per model the mean of each and its Spearman
rank correlation with the true error across the model's frames, then the correlation across
the frames of all models pooled and across the models' means, and the cost per frame.

The models: the untrained v0 (seed 0, as the edge serves it), every version in ``--registry``
(e.g. a demo's ``models/``), and with ``--graded 1,3,10,30`` PtychoNNs trained here for that
many epochs on the simulator's truth of another scan (models of graded quality).

    python benchmarks/consistency.py [--registry out/demo/models] [--graded 1,3,10,30]
        [--points 300]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from edgeloop.bluesky_plans.plans import spiral_positions
from edgeloop.config import Config
from edgeloop.edge_pva.inference import ServedModel, make_backend
from edgeloop.edge_pva.label_free import DataResidual, combine, edge_probe
from edgeloop.edge_pva.stitch import PhaseMap
from edgeloop.ioc.physics import PtychoSimulator
from edgeloop.models import kind as model_kind
from edgeloop.optics import illuminated_mask
from edgeloop.registry import Registry

FIGURES = ("overlap", "data", "published")


def true_error(phase: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    d = (phase - truth)[mask]
    return float(np.abs(d - d.mean()).mean())


def scan(served: ServedModel, sim, cfg: Config, positions, residual: DataResidual) -> dict:
    """Per frame (after the first few, which overlap nothing): each figure, the true error,
    and the seconds the data residual took."""
    pmap = PhaseMap(cfg.edge.map_size, cfg.model.input_size, cfg.sim.pixel_um)
    mask = illuminated_mask(sim.probe)
    rows = {k: [] for k in (*FIGURES, "error")}
    seconds = []
    for x, y in positions:
        frame = sim.frame(x, y)
        amp, phase = served.infer([frame])
        am, ph = amp[0, 0], phase[0, 0]
        t0 = time.perf_counter()
        surround = pmap.surroundings(x, y)
        data = residual(frame, am, ph, surround)
        seconds.append(time.perf_counter() - t0)
        overlap = pmap.disagreement(ph, x, y)
        pmap.add(ph, x, y)
        if overlap is None:
            continue
        rows["overlap"].append(overlap)
        rows["data"].append(data)
        rows["published"].append(combine(overlap, data))
        rows["error"].append(true_error(ph, sim.true_phase(x, y), mask))
    out = {k: np.array(v, np.float64) for k, v in rows.items()}
    out["seconds"] = np.array(seconds)
    return out


def graded_models(cfg: Config, sim, epochs: list[int], points: int) -> dict[str, torch.nn.Module]:
    """PtychoNNs after each of ``epochs`` epochs of one training run on the truth of a
    spiral scan away from the test scan's centre (the edge's loss: MAE on the lit pixels)."""
    from edgeloop.remote.training import ptycho_loss, train  # benchmarks may use remote/

    positions = spiral_positions(points, 0.05, (-0.9, 0.9))
    frames = [sim.frame(x, y) for x, y in positions]
    patches = np.stack([sim.patch(x, y) for x, y in positions])
    inputs = model_kind("ptychonn").preprocess(frames, cfg.model.input_size)
    targets = (np.abs(patches).astype(np.float32), np.angle(patches).astype(np.float32))
    loss = ptycho_loss(illuminated_mask(sim.probe).astype(np.float32), patches.shape[1:])
    torch.manual_seed(1)
    model = model_kind("ptychonn").build(**cfg.arch("ptychonn"))
    snapshots = {}

    def progress(epoch, _total, _val):
        if epoch in epochs:
            snapshots[f"e{epoch}"] = copy.deepcopy(model).eval()

    tcfg = dataclasses.replace(cfg.train, epochs=max(epochs), threads=1)
    t0 = time.perf_counter()
    train(model, inputs, targets, loss, tcfg, progress)
    print(f"trained {max(epochs)} epochs on {points} frames in {time.perf_counter() - t0:.0f} s")
    return snapshots


def report(rows: list[tuple[str, dict]], figures, error_name: str, unit: str) -> None:
    """Per model and overall: mean of each figure, mean true error, Spearman rho."""
    head = "".join(f" {f:>10} {'rho':>6}" for f in figures)
    print(f"{'model':>8} {'n':>5} {error_name:>10}{head}   ({unit})")
    for name, r in rows:
        cols = "".join(f" {np.nanmean(r[f]):10.4f} {_rho(r[f], r['error']):6.2f}" for f in figures)
        print(f"{name:>8} {len(r['error']):5d} {np.nanmean(r['error']):10.4f}{cols}")
    pooled = {k: np.concatenate([r[k] for _, r in rows]) for k in (*figures, "error")}
    print(
        "Spearman rho, frames of all models pooled: "
        + ", ".join(f"{f} {_rho(pooled[f], pooled['error']):.3f}" for f in figures)
        + f" (n={len(pooled['error'])})"
    )
    if len(rows) > 2:
        errors = [np.nanmean(r["error"]) for _, r in rows]
        across = {f: _rho([np.nanmean(r[f]) for _, r in rows], errors) for f in figures}
        print(
            f"Spearman rho across the {len(rows)} models' means: "
            + ", ".join(f"{f} {v:.3f}" for f, v in across.items())
        )


def _rho(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0:
        return float("nan")
    return float(spearmanr(a[ok], b[ok]).statistic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", default=None, help="a model registry (e.g. a demo's)")
    parser.add_argument("--graded", default="", help="epochs of models trained here: 1,3,10")
    parser.add_argument("--train-points", type=int, default=400)
    parser.add_argument("--points", type=int, default=300)
    parser.add_argument("--step", type=float, default=0.05)
    parser.add_argument("--save", default=None, help="write the per-frame figures (.npz)")
    args = parser.parse_args()

    cfg = Config()
    torch.set_num_threads(1)
    sim = PtychoSimulator(cfg.sim)
    s = cfg.sim
    residual = DataResidual(
        edge_probe(cfg.edge.probe_file, s.frame_size, s.probe_radius_px, s.probe_defocus)
    )
    positions = spiral_positions(args.points, args.step, (0.2, -0.15))
    torch.manual_seed(0)  # v0 as the edge serves it
    models = {"v0": model_kind("ptychonn").build(**cfg.arch("ptychonn"))}
    if args.graded:
        epochs = sorted(int(e) for e in args.graded.split(","))
        models.update(graded_models(cfg, sim, epochs, args.train_points))
    if args.registry:
        reg = Registry(args.registry)
        for version in sorted(reg.ranked("ptychonn")):
            models[f"v{version}"], _ = reg.load(version, cfg.security)
    spec = model_kind("ptychonn")
    rows, seconds = [], []
    for name, model in models.items():
        backend = make_backend("torch", model.eval(), cfg.model.input_size)
        served = ServedModel(0, spec, cfg.model.input_size, backend)
        r = scan(served, sim, cfg, positions, residual)
        rows.append((name, r))
        seconds.append(r["seconds"])
    report(rows, FIGURES, "true err", "rad")
    if args.save:
        np.savez(args.save, **{f"{n}:{k}": v for n, r in rows for k, v in r.items()})
    print(
        f"data residual: {np.median(np.concatenate(seconds)) * 1e6:.0f} us/frame median "
        f"({cfg.sim.frame_size}x{cfg.sim.frame_size}, 1 thread)"
    )


if __name__ == "__main__":
    main()
