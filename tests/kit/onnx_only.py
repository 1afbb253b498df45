"""Answer frames with an exported model record and onnxruntime alone, as someone without
edgeloop would: edgeloop cannot be imported here, the preprocessing is the card's words.

``python onnx_only.py ARCHIVE FRAMES.npy OUT.npz``: OUT holds one array per output, named
by the card's ``meaning``."""

import sys


class _NoEdgeloop:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "edgeloop":
            raise ImportError("edgeloop is not to be imported by a record's user")
        return None


sys.meta_path.insert(0, _NoEdgeloop())

import json  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402


def ptycho_input(frames: np.ndarray, n: int) -> np.ndarray:
    """The card: crop to the largest multiple of N, sum-bin to N x N, sqrt, mean 1/4."""
    ny, nx = frames.shape[1:]
    f = min(ny, nx) // n
    y0, x0 = (ny - n * f) // 2, (nx - n * f) // 2
    sub = frames[:, y0 : y0 + n * f, x0 : x0 + n * f].astype(np.float64)
    binned = sub.reshape(len(frames), n, f, n, f).sum(axis=(2, 4))
    x = np.sqrt(np.clip(binned, 0, None))
    mean = x.reshape(len(x), -1).mean(axis=1)
    return (x / (4 * np.maximum(mean, 1e-6))[:, None, None]).astype(np.float32)[:, None]


def main(archive: str, frames_path: str, out_path: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
            (top,) = {name.split("/")[0] for name in tar.getnames()}
        folder = Path(tmp) / top
        card = json.loads((folder / "card.json").read_text())
        session = ort.InferenceSession(str(folder / "model.onnx"))
        (spec,) = card["inputs"]
        x = ptycho_input(np.load(frames_path), spec["shape"][-1])
        outputs = session.run(None, {spec["name"]: x})
    np.savez(out_path, **{o["meaning"]: y for o, y in zip(card["outputs"], outputs)})
    assert not [m for m in sys.modules if m.split(".")[0] == "edgeloop"]
    print(f"answered {len(x)} frames with {top}, edgeloop not imported")


if __name__ == "__main__":
    main(*sys.argv[1:4])
