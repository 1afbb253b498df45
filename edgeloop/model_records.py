"""A model record per accepted version: what the FAIR principles for AI models ask (Ravi et
al. 2022) of what edgeloop serves. Findable: a model card says what the network is for,
what it was trained on and how well it does; accessible: plain files in one folder, or one
archive; interoperable: an ONNX graph that onnxruntime (or TensorRT) loads without edgeloop;
reusable: the licence, the provenance (runs, labels and their checksum, the parent
version, the code version) and the quality gate's signature.

Layout, under the registry (``<registry_dir>/records/<kind>-v0007/``):

- ``model.onnx``: the network (:mod:`edgeloop.onnx_export`, fp32, dynamic batch), with
  metadata properties ``edgeloop.kind``, ``edgeloop.version``, ``edgeloop.inputs`` and
  ``edgeloop.outputs`` (names, shapes, units, as JSON);
- ``weights.pt``: the registry's checkpoint, byte for byte (edgeloop's torch format);
- ``card.json`` (for programs) and ``README.md`` (the same card, for people);
- ``gate.pub``: the public key of the gate that approved the version;
- ``SHA256SUMS``: ``sha256sum`` format over the files above (``sha256sum -c SHA256SUMS``
  checks them without edgeloop), and ``SHA256SUMS.sig``: the gate's Ed25519 signature of it.

A record is written whole in a temporary folder and renamed into place, so a reader never
sees half of one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import operator
import re
import shutil
import tarfile
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

import edgeloop
from edgeloop import approval
from edgeloop.config import Config
from edgeloop.models import count_parameters
from edgeloop.onnx_export import INPUT, export_onnx, output_names
from edgeloop.registry import ModelFileError, Registry, model_from_bytes, sha256_bytes

_WRITING = threading.Lock()  # the retraining and the reference monitor both write records
RECORDS = "records"
CARD_SCHEMA = "edgeloop.model-card/1"
SUMS, SUMS_SIG = "SHA256SUMS", "SHA256SUMS.sig"
FILES = ("model.onnx", "weights.pt", "card.json", "README.md", "gate.pub")

# what each kind is for, and what its tensors mean
PURPOSE = {
    "ptychonn": {
        "technique": "X-ray ptychography",
        "intended_use": (
            "Real-time phase retrieval at the edge: the object's amplitude and phase under "
            "the probe from one far-field diffraction pattern (PtychoNN, Cherukara et al. "
            "2020), stitched into a map over a scan. For monitoring and steering an "
            "experiment; the published reconstruction is the iterative one."
        ),
        "limits": (
            "Trained on the scans named below (sample, probe, energy and geometry as in "
            "them); another probe or sample class needs retraining. Phase is relative: the "
            "global offset is not measurable."
        ),
        "input": "the pattern (counts, centred) centre-cropped to the largest multiple of N "
        "and sum-binned to N x N; then sqrt, each frame scaled to a mean of 1/4",
        "outputs": [("amplitude", "1 (transmission, 0..1)"), ("phase", "rad (-pi..pi)")],
    },
    "braggnn": {
        "technique": "High-energy diffraction microscopy (HEDM)",
        "intended_use": (
            "Sub-pixel Bragg peak positions at the edge (BraggNN, Liu et al. 2022): the "
            "centre of one peak from the patch around its brightest pixel."
        ),
        "limits": (
            "Single, unsaturated peaks away from the detector's border, as in the labels "
            "(pseudo-Voigt fits); overlapping peaks are out of scope."
        ),
        "input": "the P x P patch around a peak, min-max scaled to 0..1",
        "outputs": [("center", "(x, y) in units of the patch size (0..1 across the patch)")],
    },
}


class RecordError(RuntimeError):
    """A record that cannot be written, read, or trusted."""


def records_dir(registry_root: str | Path) -> Path:
    return Path(registry_root).expanduser() / RECORDS


def record_path(registry_root: str | Path, kind: str, version: int) -> Path:
    return records_dir(registry_root) / f"{kind}-v{version:04d}"


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


def tensors(kind: str, input_size: int, n_outputs: int) -> tuple[list[dict], list[dict]]:
    """The graph's inputs and outputs: names, shapes (``batch`` is dynamic) and units."""
    about = PURPOSE[kind]
    inputs = [
        {"name": INPUT, "shape": ["batch", 1, input_size, input_size], "dtype": "float32",
         "units": about["input"]}
    ]  # fmt: skip
    shape = (lambda: ["batch", 2]) if kind == "braggnn" else (lambda: inputs[0]["shape"])
    outputs = [
        {"name": name, "meaning": meaning, "shape": shape(), "dtype": "float32", "units": units}
        for name, (meaning, units) in zip(
            output_names(n_outputs), about["outputs"], strict=True
        )
    ]  # fmt: skip
    return inputs, outputs


def onnx_graph(model, kind: str, version: int, input_size: int) -> tuple[bytes, dict]:
    """The ONNX bytes with edgeloop's metadata properties, and those properties."""
    import onnx

    graph = onnx.load_from_string(export_onnx(model, input_size))
    inputs, outputs = tensors(kind, input_size, len(graph.graph.output))
    props = {
        "edgeloop.kind": kind,
        "edgeloop.version": str(version),
        "edgeloop.inputs": json.dumps(inputs),
        "edgeloop.outputs": json.dumps(outputs),
        "edgeloop.code_version": edgeloop.__version__,
    }
    onnx.helper.set_model_props(graph, props)
    graph.producer_name, graph.doc_string = "edgeloop", PURPOSE[kind]["intended_use"]
    return graph.SerializeToString(), props


def gate_fingerprint(public_pem: bytes) -> str:
    """sha256 of the raw public key, as people compare keys."""
    key = serialization.load_pem_public_key(public_pem)
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def card(
    meta: dict, model, input_size: int, licence: str, public_pem: bytes,
    reference: dict | None = None,
) -> dict:  # fmt: skip
    """The model card of a version, from its registry metadata; ``reference``: the first
    reference error measured of it (error, info, time), if one was."""
    reference = reference or {}
    kind, version = meta["kind"], meta["version"]
    about = PURPOSE[kind]
    inputs, outputs = tensors(kind, input_size, len(about["outputs"]))
    history = meta.get("history") or []
    labels = meta.get("labels_method") or {}
    return {
        "schema": CARD_SCHEMA,
        "name": f"edgeloop-{kind}",
        "kind": kind,
        "version": version,
        "status": meta.get("status"),
        "created": iso(meta.get("created")),
        "accepted": iso(meta.get("status_time")) if meta.get("status") == "accepted" else None,
        "technique": about["technique"],
        "intended_use": about["intended_use"],
        "limits": about["limits"],
        "architecture": {
            "class": type(model).__name__,
            "arch": meta.get("arch"),
            "parameters": count_parameters(model),
        },
        "inputs": inputs,
        "outputs": outputs,
        "training_data": {
            "runs": meta.get("runs") or [{"ref": ref} for ref in meta.get("trained_on", [])],
            "frames": meta.get("n_frames"),
            "skipped_frames": meta.get("skipped_frames", 0),
            "labels": {
                "method": labels.get("method"),
                "settings": labels.get("settings"),
                "sha256": meta.get("labels_sha256"),
            },
        },
        "metrics": {
            "held_out_loss": meta.get("val_loss"),
            "loss": "L1 of amplitude and phase, weighted by the illumination"
            if kind == "ptychonn"
            else "MSE of the centre, patch units",
            "serving_model_held_out_loss": meta.get("baseline_val_loss"),
            # a registry written before the rename says "endpoint"
            "executor_reported_held_out_loss": meta.get(
                "executor_val_loss", meta.get("endpoint_val_loss")
            ),
            "reference_error": reference.get("error"),  # None: not measured (yet)
            "reference_measured": reference.get("info"),
            "reference_time": iso(reference.get("time")),
            "epochs": len(history),
        },
        "training": {
            "settings": meta.get("train_settings"),
            "executor": meta.get("executor"),
            "trigger": meta.get("trigger"),
            "timings_s": meta.get("timings"),
        },
        "parent_version": meta.get("parent"),
        "code_version": meta.get("code_version"),
        "licence": licence,
        "weights_sha256": meta.get("sha256"),
        "approval": meta.get("approval"),
        "gate_key_sha256": gate_fingerprint(public_pem),
    }


def card_markdown(c: dict) -> str:
    """The card for people (README.md of the record)."""
    m, data = c["metrics"], c["training_data"]
    rows = "\n".join(
        f"| `{t['name']}` | {t.get('meaning', 'input')} | {t['shape']} | {t['units']} |"
        for t in c["inputs"] + c["outputs"]
    )
    runs = "\n".join(
        f"- {r.get('uid') or r['ref']}" + (f" ({r['frames']} frames)" if r.get("frames") else "")
        for r in data["runs"]
    )
    return f"""# {c["name"]} v{c["version"]}

{c["intended_use"]}

- Technique: {c["technique"]}
- Status: {c["status"]} (accepted {c["accepted"]}); created {c["created"]}
- Architecture: {c["architecture"]["class"]} {c["architecture"]["arch"]}, \
{c["architecture"]["parameters"]} parameters
- Parent version: {c["parent_version"]}; code: edgeloop {c["code_version"]}
- Licence: {c["licence"]}

## Limits

{c["limits"]}

## Tensors (model.onnx)

| name | meaning | shape | units |
|---|---|---|---|
{rows}

## Training data

{data["frames"]} frames ({data["skipped_frames"]} skipped) from:

{runs}

Labels: {data["labels"]["method"]}, sha256 `{data["labels"]["sha256"]}`; settings
`{json.dumps(data["labels"]["settings"], sort_keys=True)}`.

## Metrics

- Held-out loss ({m["loss"]}): {m["held_out_loss"]} (the model it replaced:
  {m["serving_model_held_out_loss"]})
- Reference error (the network against the conventional analysis of the same frames,
  first measured after acceptance): {
        m["reference_error"] if m["reference_error"] is not None else "not measured yet"
    }{f" ({m['reference_measured']})" if m["reference_measured"] else ""}

## Checking it

`sha256sum -c SHA256SUMS` checks the files; `SHA256SUMS.sig` is the gate's Ed25519
signature of SHA256SUMS, made with the key whose public half is `gate.pub` (sha256 of the
raw key: `{c["gate_key_sha256"]}`); `edgeloop models verify` checks both, and the gate's
approval of the weights.

## Loading it without edgeloop

```python
import numpy as np, onnxruntime as ort
session = ort.InferenceSession("model.onnx")
outputs = session.run(None, {{"x": np.zeros({_example_shape(c)}, np.float32)}})
```
"""


def _example_shape(c: dict) -> tuple:
    return tuple(1 if d == "batch" else d for d in c["inputs"][0]["shape"])


def _sums(folder: Path, names) -> bytes:
    lines = [f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}\n" for n in names]
    return "".join(lines).encode()


def write_record(
    cfg: Config, version: int, registry: Registry | None = None, reference: dict | None = None
) -> Path:
    """Write (or rewrite) the record of ``version`` from the registry; its folder. A
    rewrite keeps the reference error the record held unless ``reference`` is given.

    Raises RecordError if the version cannot be read, or has no approval of the gate."""
    with _WRITING:
        return _write_record(cfg, version, registry or Registry(cfg.registry_path), reference)


def recorded_reference(folder: Path) -> dict | None:
    """The reference error a record's card holds (error, info, time); None if none."""
    try:
        m = json.loads((folder / "card.json").read_text())["metrics"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if m.get("reference_error") is None:
        return None
    when = m.get("reference_time")
    t = dt.datetime.fromisoformat(when).timestamp() if when else None
    return {"error": m["reference_error"], "info": m.get("reference_measured"), "time": t}


def _write_record(cfg: Config, version: int, registry: Registry, reference) -> Path:
    try:
        meta = registry.meta(version)
        data = registry.read_verified(version, cfg.security)
        model, info = model_from_bytes(data, cfg.security)
        approval.check(approval.public_key(cfg.security), meta, version)
        private = approval.private_key(cfg.security)
    except (ModelFileError, approval.ApprovalError) as exc:
        raise RecordError(f"no record of model v{version}: {exc}") from exc
    kind = info["kind"]
    size = info["arch"].get("patch") if kind == "braggnn" else cfg.model.input_size
    public_pem = approval.key_paths(cfg.security)[1].read_bytes()
    graph, _ = onnx_graph(model, kind, version, size)
    target = record_path(cfg.registry_path, kind, version)
    reference = reference or recorded_reference(target)
    c = card(dict(meta, kind=kind), model, size, cfg.records.licence, public_pem, reference)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        (tmp / "model.onnx").write_bytes(graph)
        (tmp / "weights.pt").write_bytes(data)
        (tmp / "card.json").write_text(json.dumps(c, indent=2) + "\n")
        (tmp / "README.md").write_text(card_markdown(c))
        (tmp / "gate.pub").write_bytes(public_pem)
        sums = _sums(tmp, FILES)
        (tmp / SUMS).write_bytes(sums)
        (tmp / SUMS_SIG).write_text(private.sign(sums).hex() + "\n")
        tmp.chmod(0o755)
        if target.exists():  # a rewrite: the old one goes only once the new one is whole
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass
class Verdict:
    path: Path
    problems: list[str]
    key: str  # which public key the signatures were checked with

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_record(path: str | Path, public_pem: bytes | None = None) -> Verdict:
    """Check a record folder: every file against SHA256SUMS, nothing unlisted, the
    signature of SHA256SUMS and the gate's approval of the weights, with ``public_pem``
    (the gate's public key you trust) or else the record's own ``gate.pub`` (which proves
    only that the record is whole: compare its fingerprint with your gate's)."""
    path = Path(path)
    problems: list[str] = []
    key_note = "the given gate key" if public_pem else "the record's own gate.pub"
    try:
        sums = (path / SUMS).read_bytes()
        listed = dict(reversed(line.split("  ", 1)) for line in sums.decode().splitlines() if line)
    except (OSError, ValueError) as exc:
        return Verdict(path, [f"{SUMS} unreadable: {exc}"], key_note)
    for name, digest in listed.items():
        try:
            actual = hashlib.sha256((path / name).read_bytes()).hexdigest()
        except OSError as exc:
            problems.append(f"{name}: unreadable ({exc.strerror or exc})")
            continue
        if actual != digest:
            problems.append(f"{name}: sha256 {actual[:12]}... differs from {SUMS}'s")
    extra = sorted({p.name for p in path.iterdir()} - set(listed) - {SUMS, SUMS_SIG})
    problems += [f"{name}: not covered by {SUMS}" for name in extra]
    missing = [n for n in FILES if n not in listed]
    problems += [f"{SUMS} does not list {n}" for n in missing]
    try:
        pem = public_pem or (path / "gate.pub").read_bytes()
        key = serialization.load_pem_public_key(pem)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 key")
        key_note += f" (sha256 {gate_fingerprint(pem)[:16]}...)"
    except (OSError, ValueError) as exc:
        return Verdict(path, problems + [f"gate key unusable: {exc}"], key_note)
    try:
        key.verify(bytes.fromhex((path / SUMS_SIG).read_text().strip()), sums)
    except (OSError, ValueError, InvalidSignature) as exc:
        problems.append(f"{SUMS_SIG}: does not verify ({type(exc).__name__})")
    try:
        c = json.loads((path / "card.json").read_text())
        weights = (path / "weights.pt").read_bytes()
        meta = {"approval": c.get("approval"), "sha256": sha256_bytes(weights),
                "size": len(weights), "kind": c.get("kind")}  # fmt: skip
        approval.check(key, meta, c.get("version"))
    except (OSError, ValueError, AttributeError) as exc:
        problems.append(f"card.json or weights.pt unreadable: {exc}")
    except approval.ApprovalError as exc:
        problems.append(f"the gate's approval: {exc}")
    return Verdict(path, problems, key_note)


def export_record(path: str | Path, out: str | Path) -> Path:
    """The record folder as one ``.tar.gz`` (the folder at its top); ``out`` a file name or
    an existing folder to write ``<kind>-vNNNN.tar.gz`` into."""
    path, out = Path(path), Path(out).expanduser()
    if out.is_dir():
        out = out / f"{path.name}.tar.gz"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in sorted(path.iterdir()):
            tar.add(f, arcname=f"{path.name}/{f.name}")
    out.write_bytes(buf.getvalue())
    return out


def unpack(archive: str | Path, into: str | Path) -> Path:
    """An exported record unpacked into ``into`` (only plain files, inside one folder); the
    record's folder."""
    into = Path(into)
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        tops = {Path(m.name).parts[0] for m in members}
        if len(tops) != 1 or any(not m.isfile() and not m.isdir() for m in members):
            raise RecordError(f"{archive}: not an exported record (one folder of files)")
        tar.extractall(into, filter="data")
    return into / tops.pop()


# models list: filters
COMPARE = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
           "=": operator.eq}  # fmt: skip
WHERE = re.compile(r"\s*([a-z_]+)\s*(<=|>=|<|>|=)\s*([-+0-9.eE]+)\s*")


def parse_where(text: str) -> tuple[str, str, float]:
    """``"val_loss<0.01"`` -> ("val_loss", "<", 0.01); ValueError if it is not one."""
    match = WHERE.fullmatch(text)
    if not match:
        raise ValueError(f"not a metric condition: {text!r} (e.g. 'val_loss<0.01')")
    return match[1], match[2], float(match[3])


def listing(
    cfg: Config,
    kind: str | None = None,
    status: str | None = None,
    where: list[tuple[str, str, float]] = (),
    since: float | None = None,
    until: float | None = None,
) -> list[dict]:
    """The registry's versions (newest first) that pass the filters: version, kind,
    status, created, val_loss, parent, runs and the record's folder (None: no record)."""
    registry = Registry(cfg.registry_path)
    rows = []
    for version in reversed(registry.versions()):
        try:
            meta = registry.meta(version)
        except ModelFileError:
            continue
        row = {
            "version": version,
            "kind": meta.get("kind"),
            "status": meta.get("status") or "candidate",
            "created": meta.get("created"),
            "val_loss": meta.get("val_loss"),
            "parent": meta.get("parent"),
            "runs": len(meta.get("trained_on") or []),
        }
        folder = record_path(cfg.registry_path, str(row["kind"]), version)
        row["record"] = str(folder) if (folder / SUMS).exists() else None
        reference = recorded_reference(folder) if row["record"] else None
        row["reference_error"] = reference and reference["error"]
        if kind and row["kind"] != kind or status and row["status"] != status:
            continue
        created = row["created"] or 0.0
        if since is not None and created < since or until is not None and created >= until:
            continue
        if not all(
            isinstance(row.get(name), int | float) and COMPARE[op](row[name], value)
            for name, op, value in where
        ):
            continue
        rows.append(row)
    return rows


def find(cfg: Config, version: int) -> Path:
    """The record folder of ``version`` (any kind); RecordError if there is none."""
    hits = sorted(records_dir(cfg.registry_path).glob(f"*-v{version:04d}"))
    if not hits:
        raise RecordError(
            f"no record of model v{version} in {records_dir(cfg.registry_path)} "
            f"(written when a version is accepted; `edgeloop models record {version}` writes one)"
        )
    return hits[0]
