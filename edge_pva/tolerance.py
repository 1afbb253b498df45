"""How far two inference backends' outputs for the same inputs may differ, and the precision
each model kind runs in on a GPU.  One place: the tests and benchmarks/gpu_backends.py check
against these.

Units: amplitude 0..1, phase rad, BraggNN's centre in patch widths (11 px by default).
Measured on these CPUs (trained PtychoNN width 8 on the 20 real APS frames, BraggNN trained
on simulated patches), the reference being torch fp32:
- fp32, onnxruntime: phase max 1.1e-5 rad (mean 4e-7), amplitude max 1.4e-6, centre max 3e-8.
- fp16 (torch half): phase max 0.025 rad (mean 0.001; rounding the weights alone gives
  0.015), amplitude max 0.002; centre max 9.4e-4 patch widths (0.010 px) and the same mean
  error against the simulator's truth (0.195 px) as fp32.
fp16 is thus far inside what the models can tell (a trained PtychoNN's label-free
consistency is about 0.065 rad, BraggNN's error about 0.2 px).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    max_abs: float  # largest |a - b| over every output value
    mean_abs: float  # mean |a - b|


TOLERANCES: dict[tuple[str, str], dict[str, Tolerance]] = {
    ("ptychonn", "fp32"): {
        "amplitude": Tolerance(1e-5, 1e-6),
        "phase": Tolerance(1e-4, 1e-5),
    },
    ("ptychonn", "fp16"): {
        "amplitude": Tolerance(5e-3, 5e-4),
        "phase": Tolerance(5e-2, 5e-3),
    },
    ("braggnn", "fp32"): {"center": Tolerance(1e-4, 1e-5)},
    ("braggnn", "fp16"): {"center": Tolerance(3e-3, 5e-4)},
}

# edge.precision "auto": PtychoNN's convolutions are where fp16 pays; BraggNN is accurate
# enough in fp16 too (above) but its 11x11 patches are too small to gain from it on a GPU
AUTO_PRECISION = {"ptychonn": "fp16", "braggnn": "fp32"}


def resolve_precision(precision: str, kind: str) -> str:
    """edge.precision for a model kind: "fp16" or "fp32"."""
    if precision == "auto":
        return AUTO_PRECISION[kind]
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"precision must be auto, fp16 or fp32, got {precision!r}")
    return precision


def differences(kind: str, outputs: tuple[str, ...], got, ref) -> dict[str, tuple[float, float]]:
    """(max |got - ref|, mean |got - ref|) per named output."""
    if len(got) != len(ref) or len(got) != len(outputs):
        raise ValueError(f"{kind}: {len(got)} outputs against {len(ref)}, named {outputs}")
    out = {}
    for name, a, b in zip(outputs, got, ref):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            raise ValueError(f"{kind} {name}: shape {a.shape} against {b.shape}")
        diff = np.abs(a - b)
        out[name] = (float(diff.max(initial=0.0)), float(diff.mean()) if diff.size else 0.0)
    return out


def violations(kind: str, precision: str, outputs: tuple[str, ...], got, ref) -> list[str]:
    """What exceeds the tolerance of ``(kind, precision)``, one line per output; [] if
    nothing.  NaN anywhere is a violation."""
    tolerances = TOLERANCES[(kind, precision)]
    found = []
    for name, (worst, mean) in differences(kind, outputs, got, ref).items():
        tol = tolerances[name]
        if not (worst <= tol.max_abs and mean <= tol.mean_abs):
            found.append(
                f"{kind} {name} ({precision}): max |diff| {worst:.3g} (allowed "
                f"{tol.max_abs:g}), mean {mean:.3g} (allowed {tol.mean_abs:g})"
            )
    return found
