"""Every inference backend that runs on this host: outputs against torch on the CPU (within
edge_pva/tolerance.py's TOLERANCES) and frames/s at batch 1..64; the others are listed with
the reason they were skipped.

Each backend gets the same weights and inputs (PtychoNN: Poisson frames through the edge's
preprocessing; BraggNN: simulated peak patches).  A rate is whole calls as the edge makes
them: host arrays in, host arrays out (copies to and from the GPU included).  tensorrt's
"build s" is the engine build, or its load when --engine-cache already holds it.  Exits 1 if
any backend's outputs are outside the tolerance.

    python benchmarks/gpu_backends.py [--kind ptychonn|braggnn|both] [--batches 1,4,16,64]
        [--width 32] [--registry DIR] [--precision auto|fp16|fp32] [--engine-cache DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgeloop.config import Config
from edgeloop.edge_pva.inference import (
    BACKENDS,
    BackendOptions,
    make_backend,
    unavailable_reason,
)
from edgeloop.edge_pva.tolerance import (
    AUTO_PRECISION,
    differences,
    resolve_precision,
    violations,
)
from edgeloop.ioc.hedm_sim import make_patch_dataset
from edgeloop.models import kind as model_kind
from edgeloop.registry import Registry


def network(kind: str, cfg: Config, width: int | None, registry: str | None):
    """The registry's accepted model of ``kind`` when --registry names one, else untrained
    weights (seed 0) of the configured architecture (--width overriding its width)."""
    if registry:
        reg = Registry(registry)
        version = reg.accepted(kind)
        if version is not None:
            model, _ = reg.load(version, cfg.security)
            return model.eval(), f"registry v{version}"
    torch.manual_seed(0)
    arch = cfg.arch(kind)
    if width:
        arch["width"] = width
    return model_kind(kind).build(**arch).eval(), f"untrained {arch}"


def inputs(kind: str, size: int, n: int) -> np.ndarray:
    spec = model_kind(kind)
    if kind == "braggnn":
        patches, _ = make_patch_dataset(n, size, seed=5)
        return spec.preprocess(patches, size)
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    speckle = np.exp(-(xx**2 + yy**2) / (2 * (size / 8) ** 2))  # a central bright disc
    frames = [rng.poisson(1 + 500 * speckle * rng.uniform(0.5, 1.5)) for _ in range(n)]
    return spec.preprocess([f.astype(np.float32) for f in frames], size)


def rate(backend, batch: np.ndarray, seconds: float) -> float:
    """Frames (or patches) per second at this batch size."""
    for _ in range(3):  # warm-up: cuDNN/TensorRT tactics, allocator
        backend(batch)
    calls, t0 = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - t0 < seconds:
        backend(batch)
        calls += 1
    return len(batch) * calls / (time.perf_counter() - t0)


def run_kind(kind: str, args, cfg: Config) -> bool:
    """Print the table of one model kind; False if any backend is outside the tolerance."""
    size = cfg.input_size(kind)
    model, what = network(kind, cfg, args.width, args.registry)
    batches = [int(b) for b in args.batches.split(",")]
    x = inputs(kind, size, max(max(batches), 64))
    ref = make_backend("torch", model, size, args.threads)(x[:64])
    outputs = model_kind(kind).outputs
    rows, ok = [], True
    print(f"\n{kind} ({what}, {size}x{size}), reference torch fp32 on the CPU")
    for name in BACKENDS:
        if unavailable_reason(name):
            continue
        options = BackendOptions(
            kind=kind,
            precision=args.precision,
            max_batch=max(batches),
            engine_cache=Path(args.engine_cache),
        )
        t0 = time.perf_counter()
        backend = make_backend(name, model, size, args.threads, options)
        build_s = time.perf_counter() - t0
        precision = getattr(backend, "precision", "fp32")
        got = backend(x[:64])
        bad = violations(kind, precision, outputs, got, ref)
        ok &= not bad
        diffs = differences(kind, outputs, got, ref)
        diff = ", ".join(f"{o} {d[0]:.1e}" for o, d in diffs.items())
        rates = [rate(backend, x[:b], args.seconds) for b in batches]
        rows.append(
            [name, precision, f"{build_s:.1f}", diff, "yes" if not bad else "NO"]
            + [f"{r:,.0f}" for r in rates]
        )
        for line in bad:
            print("  outside the tolerance:", line)
    header = ["backend", "precision", "build s", "max |diff|", "within"]
    header += [f"b={b} /s" for b in batches]
    table([header, *rows])
    return ok


def table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print(
            "  "
            + "  ".join(
                c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))
            )
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=["ptychonn", "braggnn", "both"], default="both")
    ap.add_argument("--batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--seconds", type=float, default=1.0, help="timed per batch size")
    ap.add_argument("--width", type=int, help="network width (default: the config's)")
    ap.add_argument("--registry", help="serve this registry's accepted models instead")
    ap.add_argument("--precision", choices=["auto", "fp16", "fp32"], default="auto")
    ap.add_argument("--engine-cache", help="tensorrt engines (default: a temporary folder)")
    ap.add_argument("--threads", type=int, default=1, help="CPU backends' threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = Config()
    with tempfile.TemporaryDirectory() as tmp:
        args.engine_cache = args.engine_cache or tmp
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        auto = ", ".join(f"{k} {resolve_precision(args.precision, k)}" for k in AUTO_PRECISION)
        print(f"torch {torch.__version__}, GPU: {gpu}, precision {args.precision} ({auto})")
        kinds = list(AUTO_PRECISION) if args.kind == "both" else [args.kind]
        results = [run_kind(kind, args, cfg) for kind in kinds]  # every kind, no short cut
        ok = all(results)
    skipped = {name: unavailable_reason(name) for name in BACKENDS}
    if any(skipped.values()):
        print("\nskipped:")
        for name, reason in skipped.items():
            if reason:
                print(f"  {name}: {reason}")
    print("\nall outputs within the tolerance" if ok else "\nSOME OUTPUTS OUTSIDE THE TOLERANCE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
