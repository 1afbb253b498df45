"""Does the edge's label-free consistency follow the true error?

Simulates a spiral scan, runs each given PtychoNN (the untrained model v0 and every version
in a registry, e.g. a demo's ``models/``) on its frames as the edge does, stitches the
answers in scan order, and records per frame the disagreement with the map so far
(``PhaseMap.disagreement``, what ``edge:Consistency`` publishes) beside the true phase error
against the simulator's object.  Prints the per-model means and the Spearman rank
correlation across frames (all models pooled) and across models.

    python benchmarks/consistency.py [--registry out/demo/models] [--points 500]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy.stats import spearmanr

from edgeloop.bluesky_plans.plans import spiral_positions
from edgeloop.config import Config
from edgeloop.edge_pva.inference import ServedModel, make_backend
from edgeloop.edge_pva.stitch import PhaseMap
from edgeloop.ioc.physics import PtychoSimulator
from edgeloop.models import kind as model_kind
from edgeloop.optics import illuminated_mask
from edgeloop.registry import Registry


def true_error(phase: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    d = (phase - truth)[mask]
    return float(np.abs(d - d.mean()).mean())


def scan(served: ServedModel, sim, cfg: Config, positions) -> tuple[np.ndarray, np.ndarray]:
    """Per frame (after the first few, which overlap nothing): consistency, true error."""
    pmap = PhaseMap(cfg.edge.map_size, cfg.model.input_size, cfg.sim.pixel_um)
    mask = illuminated_mask(sim.probe)
    cons, errs = [], []
    for x, y in positions:
        _, phase = served.infer([sim.frame(x, y)])
        ph = phase[0, 0]
        c = pmap.disagreement(ph, x, y)
        pmap.add(ph, x, y)
        if c is not None:
            cons.append(c)
            errs.append(true_error(ph, sim.true_phase(x, y), mask))
    return np.array(cons), np.array(errs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", default=None, help="a model registry (e.g. a demo's)")
    parser.add_argument("--points", type=int, default=500)
    parser.add_argument("--step", type=float, default=0.05)
    args = parser.parse_args()

    cfg = Config()
    sim = PtychoSimulator(cfg.sim)
    positions = spiral_positions(args.points, args.step, (0.2, -0.15))
    torch.manual_seed(0)
    models = {0: model_kind("ptychonn").build(**cfg.arch("ptychonn"))}
    if args.registry:
        reg = Registry(args.registry)
        for version in reg.ranked("ptychonn"):
            models[version], _ = reg.load(version, cfg.security)
    spec = model_kind("ptychonn")
    rows, pooled = [], ([], [])
    for version, model in sorted(models.items()):
        backend = make_backend("torch", model.eval(), cfg.model.input_size)
        served = ServedModel(version, spec, cfg.model.input_size, backend)
        cons, errs = scan(served, sim, cfg, positions)
        rho = spearmanr(cons, errs).statistic
        rows.append((version, len(cons), cons.mean(), errs.mean(), rho))
        pooled[0].extend(cons)
        pooled[1].extend(errs)
    print(f"{'model':>6} {'frames':>7} {'consistency':>12} {'true error':>11} {'rho frames':>11}")
    for version, n, c, e, rho in rows:
        print(f"v{version:<5} {n:7d} {c:12.4f} {e:11.4f} {rho:11.3f}")
    rho = spearmanr(*pooled).statistic
    print(f"Spearman rho, frames of all models pooled: {rho:.3f} (n={len(pooled[0])})")
    if len(rows) > 2:
        across = spearmanr([r[2] for r in rows], [r[3] for r in rows]).statistic
        print(f"Spearman rho across models: {across:.3f}")


if __name__ == "__main__":
    main()
