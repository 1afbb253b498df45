"""Frame compression at the edge: compression ratio and decode cost of each NDPluginCodec
codec on simulated frames (HEDM 512x512 uint16, ptychography 64x64 int32) and the real APS
ptychography frames (512x512 int32), against decoding the same frame uncompressed.

    python benchmarks/codecs.py [--repeat 50]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from edgeloop import codecs, ntnd
from edgeloop.config import HedmConfig, SimConfig
from edgeloop.ioc.hedm_sim import HedmSimulator
from edgeloop.ioc.physics import PtychoSimulator

APS = Path(__file__).resolve().parents[2] / "shared" / "data" / "aps-ptycho-test235.npz"


def frame_sets() -> dict[str, list[np.ndarray]]:
    hedm = HedmSimulator(HedmConfig())
    ptycho = PtychoSimulator(SimConfig())
    sets = {
        "HEDM 512^2 uint16": [hedm.frame(float(w))[0] for w in np.linspace(0, 30, 8)],
        "ptycho 64^2 int32": [ptycho.frame(x, 0.1) for x in np.linspace(-0.5, 0.5, 8)],
    }
    if APS.exists():
        sets["APS ptycho 512^2 int32"] = list(np.load(APS)["reciprocal"][:8])
    return sets


def decode_ms(values, repeat: int) -> float:
    t0 = time.perf_counter()
    for _ in range(repeat):
        for v in values:
            ntnd.decode(v)
    return (time.perf_counter() - t0) / (repeat * len(values)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()
    print(f"{'frames':24s} {'codec':6s} {'ratio':>6s} {'decode ms':>10s} {'x plain':>8s}")
    for name, frames in frame_sets().items():
        plain = decode_ms([ntnd.build(f, i + 1) for i, f in enumerate(frames)], args.repeat)
        print(f"{name:24s} {'none':6s} {1.0:6.2f} {plain:10.3f} {1.0:8.1f}")
        for codec in codecs.CODECS:
            values = [ntnd.build(f, i + 1, codec=codec) for i, f in enumerate(frames)]
            ratio = sum(v["uncompressedSize"] for v in values) / sum(
                v["compressedSize"] for v in values
            )
            ms = decode_ms(values, args.repeat)
            print(f"{name:24s} {codec:6s} {ratio:6.2f} {ms:10.3f} {ms / plain:8.1f}")


if __name__ == "__main__":
    main()
