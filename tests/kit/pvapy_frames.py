"""A pvapy ``PvaServer`` (pvDatabase, with the data distributor) serving NTNDArray frames
with SampleX/SampleY NDAttributes, as areaDetector attaches the stage position.

``python pvapy_frames.py CHANNEL FRAMES.npz FPS`` serves CHANNEL (uniqueId 0 until told)
and prints ``ready``; then, for each line on stdin: ``one`` posts the file's first frame
without a position, ``go`` every frame of the file (``frames``: (n, h, w) float32, ``x``,
``y``: positions, um) at FPS; uniqueIds count on from 1; each prints ``posted <last
uniqueId>``.  End of input stops it.  Run it in its own process: pvapy and p4p each bring
their own EPICS libraries."""

import sys
import time

import numpy as np
import pvaccess as pva
from pvapy.utility.adImageUtility import AdImageUtility


def frame(uid: int, data: np.ndarray, xy: tuple | None = None):
    value = AdImageUtility.generateNtNdArray2D(uid, data)
    attributes = [pva.NtAttribute("ColorMode", pva.PvInt(0))]
    if xy is not None:
        attributes += [
            pva.NtAttribute("SampleX", pva.PvDouble(float(xy[0]))),
            pva.NtAttribute("SampleY", pva.PvDouble(float(xy[1]))),
        ]
    value["attribute"] = attributes
    return value


def main(channel: str, path: str, fps: float) -> None:
    data = np.load(path)
    frames, xs, ys = data["frames"].astype(np.float32), data["x"], data["y"]
    server = pva.PvaServer()
    server.addRecord(channel, pva.NtNdArray(), None)
    print("ready", flush=True)
    uid = 0
    for line in sys.stdin:
        command = line.strip()
        if command == "one":
            uid += 1
            server.update(channel, frame(uid, frames[0]))
        elif command == "go":
            t0 = time.monotonic()
            for i, (image, x, y) in enumerate(zip(frames, xs, ys)):
                uid += 1
                server.update(channel, frame(uid, image, (x, y)))
                time.sleep(max(0.0, t0 + (i + 1) / fps - time.monotonic()))
        else:
            continue
        print(f"posted {uid}", flush=True)
    server.stop()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
