"""The retraining steps as plain functions of references (paths) and small dicts, so any
``concurrent.futures`` executor can run them where the data are reachable."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import h5py
import numpy as np

from edgeloop import registry as reg
from edgeloop.config import TrainConfig
from edgeloop.models import kind as model_kind
from edgeloop.optics import illuminated_mask, make_probe
from edgeloop.remote.labels import make_labels
from edgeloop.scanfile import read_scan

log = logging.getLogger(__name__)


def analyze(request: dict) -> dict:
    """Conventional phase retrieval on each staged scan; writes one labels file.

    request: scans (paths), pixel_um, probe {size, radius_px, defocus}, epochs, algorithm,
    threads, input_size, kind, out (labels file path).
    Returns: labels (path), sha256, n_frames, seconds.
    """
    t0 = time.perf_counter()
    spec = model_kind(request["kind"])
    pr = request["probe"]
    frames_all, amp_all, phase_all = [], [], []
    for path in request["scans"]:
        scan = read_scan(path)
        frames = scan["frames"].astype(np.float32)
        probe = make_probe(frames.shape[-1], pr["radius_px"], pr["defocus"])
        amp, phase = make_labels(frames, scan["positions_um"], request["pixel_um"], probe,
                                 request["epochs"], request["algorithm"], request["threads"])
        if amp.shape[-1] != request["input_size"]:
            raise ValueError(f"{path}: frames {frames.shape[-1]} px but the network takes "
                             f"{request['input_size']} px labels")
        frames_all.append(spec.preprocess(list(frames), request["input_size"]))
        amp_all.append(amp)
        phase_all.append(phase)
        log.info("labels for %s: %d frames", path, len(frames))
    out = Path(request["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with h5py.File(tmp, "w") as f:
        f["inputs"] = np.concatenate(frames_all)
        f["amplitude"] = np.concatenate(amp_all)
        f["phase"] = np.concatenate(phase_all)
        probe = make_probe(request["input_size"], pr["radius_px"], pr["defocus"])
        f["weight"] = illuminated_mask(probe).astype(np.float32)  # where a frame informs
        f.attrs["scans"] = json.dumps(list(map(str, request["scans"])))
    tmp.replace(out)
    return {"labels": str(out), "sha256": reg.sha256_bytes(out.read_bytes()),
            "n_frames": int(sum(len(a) for a in amp_all)),
            "seconds": time.perf_counter() - t0}


def train_model(request: dict) -> dict:
    """Train from the given checkpoint (or fresh); returns the model as bytes + metrics.

    request: labels, labels_sha256, init (checkpoint path or None), init_sha256, kind,
    arch, train (TrainConfig fields).
    """
    t0 = time.perf_counter()
    from edgeloop.remote.training import ptycho_loss, train

    data = Path(request["labels"]).read_bytes()
    if reg.sha256_bytes(data) != request["labels_sha256"]:
        raise ValueError(f"labels file {request['labels']} fails its checksum")
    with h5py.File(request["labels"], "r") as f:
        inputs, amp, phase = f["inputs"][()], f["amplitude"][()], f["phase"][()]
        weight = f["weight"][()] if "weight" in f else None
    spec = model_kind(request["kind"])
    if request.get("init"):
        init = Path(request["init"]).read_bytes()
        if reg.sha256_bytes(init) != request["init_sha256"]:
            raise ValueError(f"checkpoint {request['init']} fails its checksum")
        model, info = reg.model_from_bytes(init)
        arch = info["arch"]
    else:
        arch = request["arch"]
        model = spec.build(**arch)
    cfg = TrainConfig(**request["train"])
    model, val_loss, history = train(model, inputs, (amp, phase),
                                     ptycho_loss(weight, amp.shape[-2:]), cfg)
    blob = reg.model_to_bytes(spec.name, arch, model)
    return {"model": blob, "sha256": reg.sha256_bytes(blob), "val_loss": float(val_loss),
            "history": history, "n_frames": int(len(inputs)), "arch": arch,
            "seconds": time.perf_counter() - t0}
