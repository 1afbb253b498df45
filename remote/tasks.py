"""The retraining steps as plain functions of references (paths) and small dicts, so any
``concurrent.futures`` executor can run them where the data are reachable."""

from __future__ import annotations

import base64
import json
import logging
import time
from pathlib import Path

import h5py
import numpy as np

from edgeloop import registry as reg
from edgeloop import signing, tiled_runs
from edgeloop.config import SecurityConfig, TrainConfig
from edgeloop.models import kind as model_kind
from edgeloop.optics import illuminated_mask, make_probe
from edgeloop.remote.labels import make_labels, positions_px
from edgeloop.scanfile import read_scan

log = logging.getLogger(__name__)


def analyze(request: dict) -> dict:
    """The conventional analysis of the staged scans, which labels the training data; writes
    one labels file.  ``request["kind"]`` picks it: phase retrieval for ``ptychonn``,
    pseudo-Voigt peak fitting for ``braggnn``.

    Frames holding NaN/Inf pixels are left out, counted (``skipped_frames`` in the result
    and the labels file's attributes) and logged.

    Returns: labels (path), sha256, n_frames (training samples), skipped_frames, seconds.
    """
    analyses = {"ptychonn": _analyze_ptycho, "braggnn": _analyze_hedm}
    try:
        run = analyses[request["kind"]]
    except KeyError:
        raise ValueError(f"no analysis for model kind {request['kind']!r}") from None
    t0 = time.perf_counter()
    out = Path(request["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with h5py.File(tmp, "w") as f:
        n, skipped = run(request, f)
        f.attrs["skipped_frames"] = skipped
        f.attrs["scans"] = json.dumps(list(map(str, request["scans"])))
        f.attrs["kind"] = request["kind"]
    tmp.replace(out)
    return {
        "labels": str(out),
        "sha256": reg.sha256_bytes(out.read_bytes()),
        "n_frames": int(n),
        "skipped_frames": int(skipped),
        "seconds": time.perf_counter() - t0,
    }


def _finite(path, frames: np.ndarray, *more: np.ndarray) -> np.ndarray:
    """Which frames (and their positions) hold only finite values; warns about the rest."""
    ok = np.isfinite(frames.reshape(len(frames), -1)).all(axis=1)
    for values in more:
        ok &= np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if not ok.all():
        log.warning(
            "%s: %d of %d frames hold NaN/Inf values; left out of training",
            path,
            int((~ok).sum()),
            len(ok),
        )
    return ok


def _analyze_hedm(request: dict, f: h5py.File) -> tuple[int, int]:
    """Bragg peaks of every frame -> patches -> a 2-D pseudo-Voigt fit each; the fitted
    centres label BraggNN.  Border and saturated peaks, and failed fits, are left out.

    request: scans, patch, sigma, min_separation.  Writes inputs (n, 1, P, P), center (n, 2)
    as (x, y) in patch widths.
    """
    from edgeloop.peaks import peak_patches
    from edgeloop.remote.peakfit import fit_patches

    size = request["patch"]
    kept, seen, skipped = [], 0, 0
    for path in request["scans"]:
        scan = read_scan(path)
        if scan["technique"] != "hedm":
            raise ValueError(f"{path} is a {scan['technique']} scan, not HEDM")
        ok = _finite(path, scan["frames"])
        skipped += int((~ok).sum())
        for frame in scan["frames"][ok]:
            peaks, patches, _ = peak_patches(
                frame, size, sigma=request["sigma"], min_separation=request["min_separation"]
            )
            seen += len(patches)
            kept.append(patches[~(peaks.border | peaks.saturated)])
        log.info("peaks of %s: %d frames", path, len(scan["frames"]))
    patches = np.concatenate(kept) if kept else np.zeros((0, size, size), np.float32)
    centres, ok = fit_patches(patches)
    log.info(
        "pseudo-Voigt fits: %d of %d patches labelled (%d peaks seen)",
        ok.sum(),
        len(patches),
        seen,
    )
    if ok.sum() < 10:
        raise ValueError(
            f"only {int(ok.sum())} peaks could be fitted in "
            f"{len(request['scans'])} scan(s); need at least 10 to train"
        )
    f["inputs"] = model_kind("braggnn").preprocess(patches[ok], size)
    f["center"] = (centres[ok] / size).astype(np.float32)
    return int(ok.sum()), skipped


def _analyze_ptycho(request: dict, f: h5py.File) -> tuple[int, int]:
    """Phase retrieval (ptychi) on each scan; the object's patches label PtychoNN.

    request: scans, pixel_um, probe {radius_px, defocus}, epochs, algorithm, threads,
    input_size, and optionally cache_dir: each scan's labels (and reconstruction) are kept
    there, so a growing training set re-labels only its new scans.  Writes what
    :func:`prepare_frames` writes, and amplitude, phase.
    """
    parts, skipped = _per_scan(scan_labels, request)
    n = _write_frames(f, request, parts)
    f["amplitude"] = np.concatenate([p["amplitude"] for p in parts])
    f["phase"] = np.concatenate([p["phase"] for p in parts])
    return n, skipped


def prepare_frames(request: dict) -> dict:
    """The staged scans as PtychoNN's training inputs without labels (what physics-informed
    training needs, in seconds instead of phase retrieval's minutes): the same frames in
    the same order as :func:`analyze` labels them, so both share one held-out split.

    request: as :func:`analyze`'s for ``ptychonn``.  Returns: frames (path), sha256,
    n_frames, skipped_frames, seconds."""
    t0 = time.perf_counter()
    out = Path(request["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    parts, skipped = _per_scan(scan_inputs, request)
    with h5py.File(tmp, "w") as f:
        n = _write_frames(f, request, parts)
        f.attrs["skipped_frames"] = skipped
        f.attrs["scans"] = json.dumps(list(map(str, request["scans"])))
        f.attrs["kind"] = "ptychonn"
    tmp.replace(out)
    return {
        "frames": str(out),
        "sha256": reg.sha256_bytes(out.read_bytes()),
        "n_frames": n,
        "skipped_frames": skipped,
        "seconds": time.perf_counter() - t0,
    }


def _per_scan(read, request: dict) -> tuple[list[dict], int]:
    """``read(path, request)`` of each scan that has finite frames, and the frames left out."""
    parts, skipped = [], 0
    for path in request["scans"]:
        part = read(path, request)
        skipped += part["skipped"]
        if part["inputs"] is not None:
            parts.append(part)
    return parts, skipped


def _write_frames(f: h5py.File, request: dict, parts: list[dict]) -> int:
    """inputs, positions_px (row, col), scan (0, 1, ... per scan with frames), probe (the
    nominal one, complex) and weight (where it lights the sample) of a training set."""
    if not parts:
        raise ValueError(f"no finite frames in {len(request['scans'])} scan(s) to train on")
    f["inputs"] = np.concatenate([p["inputs"] for p in parts])
    f["positions_px"] = np.concatenate([p["positions_px"] for p in parts])
    f["scan"] = np.concatenate(
        [np.full(len(p["inputs"]), i, np.int32) for i, p in enumerate(parts)]
    )
    pr = request["probe"]
    probe = make_probe(request["input_size"], pr["radius_px"], pr["defocus"])
    f["probe"] = probe
    f["weight"] = illuminated_mask(probe).astype(np.float32)
    return len(f["inputs"])


def scan_inputs(path, request: dict) -> dict:
    """inputs (None if no finite frame), positions_px, skipped and the finite frames of
    one scan: the frames a training set takes and their order."""
    scan = read_scan(path)
    ok = _finite(path, scan["frames"], scan["positions_um"])
    out = {"inputs": None, "skipped": int((~ok).sum())}
    if ok.any():
        frames = scan["frames"][ok].astype(np.float32)
        if frames.shape[-1] != request["input_size"]:
            raise ValueError(
                f"{path}: frames {frames.shape[-1]} px but the network takes "
                f"{request['input_size']} px"
            )
        positions_um = scan["positions_um"][ok]
        out.update(
            inputs=model_kind("ptychonn").preprocess(list(frames), request["input_size"]),
            positions_px=positions_px(positions_um, request["pixel_um"]),
            positions_um=positions_um,
            frames=frames,
        )
    return out


LABEL_KEYS = ("pixel_um", "probe", "epochs", "algorithm", "input_size")


def labels_cache_file(path, request: dict) -> Path | None:
    """Where the labels of one scan are cached: named by the scan file (its path, size and
    modification time) or the Tiled run, and every analysis setting that changes them;
    None: no cache."""
    if not request.get("cache_dir"):
        return None
    if tiled_runs.is_ref(path):  # a finished run stored in Tiled does not change
        name = [str(path)]
    else:
        st = Path(path).stat()
        name = [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]
    key = json.dumps(name + [request[k] for k in LABEL_KEYS], sort_keys=True)
    return Path(request["cache_dir"]) / f"labels_{reg.sha256_bytes(key.encode())[:24]}.h5"


def scan_labels(path, request: dict) -> dict:
    """inputs, amplitude, phase, positions_px (None if no finite frame), skipped, and
    ``object`` (the reconstruction, when there is one) of one scan: the one way a scan is
    labelled by phase retrieval (ptychi), from the cache when it holds them (it keeps the
    object too)."""
    cached = labels_cache_file(path, request)
    if cached is not None and cached.exists():
        try:
            with h5py.File(cached, "r") as c:
                if c.attrs["n"] == 0:
                    return {"inputs": None, "skipped": int(c.attrs["skipped"])}
                log.info("labels for %s: %d frames (cached)", path, c.attrs["n"])
                out = {
                    **{k: c[k][()] for k in ("inputs", "amplitude", "phase")},
                    "skipped": int(c.attrs["skipped"]),
                    "object": c["recon/object"][()] if "recon/object" in c else None,
                }
                if "positions_px" in c:
                    return dict(out, positions_px=c["positions_px"][()])
            # a cache of before the positions were kept: read them, not ptychi again
            return dict(out, positions_px=scan_inputs(path, request)["positions_px"])
        except (OSError, KeyError) as exc:  # a torn or foreign file: label again
            log.warning("labels cache %s unreadable (%s): labelling again", cached, exc)
    scanned = scan_inputs(path, request)
    out = {k: scanned[k] for k in ("inputs", "skipped")}
    recon = {}
    if scanned["inputs"] is not None:
        frames = scanned["frames"]
        pr = request["probe"]
        probe = make_probe(frames.shape[-1], pr["radius_px"], pr["defocus"])
        amp, phase = make_labels(
            frames,
            scanned["positions_um"],
            request["pixel_um"],
            probe,
            request["epochs"],
            request["algorithm"],
            request["threads"],
            recon,
        )
        out.update(amplitude=amp, phase=phase, positions_px=scanned["positions_px"])
        log.info("labels for %s: %d frames", path, len(frames))
    if cached is not None:
        _write_cache(cached, path, out, recon)
    return dict(out, object=recon.get("object"))


def _write_cache(cached: Path, path, labels: dict, recon: dict) -> None:
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.tmp")
    with h5py.File(tmp, "w") as c:
        c.attrs["scan"] = str(path)
        c.attrs["skipped"] = labels["skipped"]
        c.attrs["n"] = 0 if labels["inputs"] is None else len(labels["inputs"])
        if labels["inputs"] is not None:
            for k in ("inputs", "amplitude", "phase", "positions_px"):
                c[k] = labels[k]
        for k, v in recon.items():  # the reconstruction, for pictures and comparisons
            c[f"recon/{k}"] = v
    tmp.replace(cached)


def train_model(request: dict) -> dict:
    """Train from the given checkpoint (or fresh); returns the model as bytes + metrics,
    signed with the key in ``request["signing_key_file"]`` on this machine.

    request: labels, labels_sha256 (with ``train.loss = "physics"``: a file of frames,
    ``prepare_frames``), init (checkpoint path or None), init_sha256, kind,
    arch, train (TrainConfig fields), signing_key_file, and optionally security (the model
    bounds, SecurityConfig fields), baseline / baseline_sha256 (the serving model: its loss
    on the same held-out split is returned as ``baseline_val_loss``).
    """
    t0 = time.perf_counter()
    from edgeloop.remote.held_out import read_training_set
    from edgeloop.remote.training import evaluate, split, train

    if not request.get("signing_key_file"):
        raise ValueError("the train request names no signing_key_file")
    key = signing.load_key(request["signing_key_file"])  # before hours of training
    security = SecurityConfig(**request.get("security", {}))
    spec = model_kind(request["kind"])
    cfg = TrainConfig(**dict(request["train"], keep_initial=bool(request.get("init"))))
    inputs, targets, loss = read_training_set(
        request["labels"], request["labels_sha256"], spec.name, cfg
    )
    # the figures reported are the label loss's (the gate's) where the file has labels:
    # with "both", its labels (the targets' first two) and label term, from the same read
    judge = None
    if cfg.loss == "labels":
        judge = (inputs, targets, loss)
    elif cfg.loss == "both":
        judge = (inputs, targets[:2], loss.labels_term)
    if request.get("init"):
        model, info = _checkpoint(request["init"], request["init_sha256"], spec.name, security)
        arch = info["arch"]
    else:
        arch = reg.check_arch(spec.name, request["arch"], security)
        model = spec.build(**arch)
    _, val_idx = split(len(inputs), cfg.val_fraction, cfg.seed)  # train()'s split
    baseline_val_loss = None
    if request.get("baseline") and judge is not None:
        baseline, _ = _checkpoint(
            request["baseline"], request["baseline_sha256"], spec.name, security
        )
        baseline_val_loss = evaluate(baseline, *judge, val_idx)
    model, objective, history = train(model, inputs, targets, loss, cfg)
    val_loss = None
    if judge is not None:
        val_loss = objective if cfg.loss == "labels" else evaluate(model, *judge, val_idx)
    blob = reg.model_to_bytes(spec.name, arch, model)
    result = {
        "model": blob,
        "sha256": reg.sha256_bytes(blob),
        "kind": spec.name,
        # the held-out label loss; None when trained on frames without labels (physics)
        "val_loss": None if val_loss is None else float(val_loss),
        "loss": cfg.loss,
        "objective_val_loss": float(objective),
        "baseline_val_loss": baseline_val_loss,
        "history": history,
        "n_frames": int(len(inputs)),
        "arch": arch,
        "seconds": time.perf_counter() - t0,
        # what the request was, signed with the result (signing.SIGNED_FIELDS)
        "request_id": request.get("request_id"),
        "labels_sha256": request["labels_sha256"],
        "init_sha256": request.get("init_sha256") if request.get("init") else None,
    }
    result["signature"] = signing.sign(key, blob, result)
    return result


def train_on_labels(request: dict, labels: dict) -> dict:
    """:func:`train_model` on the labels :func:`analyze` returned just before (a Globus
    Flow's Train state gets its Analyze state's output), its result JSON-safe: the model as
    base64 in ``model_b64`` (a flow's output is JSON)."""
    result = train_model(dict(request, labels=labels["labels"], labels_sha256=labels["sha256"]))
    return dict(result, model=None, model_b64=base64.b64encode(result["model"]).decode())


def _checkpoint(path: str, sha256: str, kind: str, security: SecurityConfig):
    data = Path(path).read_bytes()
    if reg.sha256_bytes(data) != sha256:
        raise ValueError(f"checkpoint {path} fails its checksum")
    model, info = reg.model_from_bytes(data, security)
    if info["kind"] != kind:
        raise ValueError(f"checkpoint {path} is a {info['kind']}, not {kind}")
    return model, info
