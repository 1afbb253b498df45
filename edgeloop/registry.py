"""Versioned model files on disk (core), shared by remote/ (writes candidates) and edge_pva/
(loads, validates, marks accepted).

Layout: ``<root>/v0001.pt`` (torch checkpoint: kind, arch, state_dict) beside
``<root>/v0001.json`` (metadata incl. sha256, kind); ``<root>/accepted.json`` names, per model
kind, the version the edge last accepted, and ``accepted.copy.json`` holds the same (read when
accepted.json is corrupt).  Version numbers are shared by all kinds.  Every
file is written to a temp name and renamed, so readers never see a half-written file.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import logging
import math
import os
import re
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from edgeloop.config import SecurityConfig
from edgeloop.models import kind as model_kind

log = logging.getLogger(__name__)

VERSION_FILE = re.compile(r"v(\d+)\.json")
ACCEPTED = "accepted.json"
ACCEPTED_COPY = "accepted.copy.json"  # written with it: what is read when it is corrupt


class ModelFileError(RuntimeError):
    """A model file that is corrupt, fails its checksum, is out of bounds, or does not build:
    retrying will not help."""


class RegistryCorrupt(RuntimeError):
    """The record of accepted versions (accepted.json and its copy) cannot be read: refused,
    never taken as "nothing accepted" (the quality gate would then have no baseline)."""


class ModelUnavailable(ModelFileError):
    """A model that cannot be read or tried now (missing, permission, I/O error, out of
    memory): it may be fine later, so it is never a reason to mark a version rejected."""


# what fails for want of a resource, not because of the model: an error of these kinds while
# loading or trying a model rejects nothing (torch.OutOfMemoryError is CUDA's, and CPU
# allocators raise RuntimeError "... not enough memory" as well)
TRANSIENT_ERRORS = (MemoryError, OSError, torch.OutOfMemoryError)
NOT_NOW = "not loaded now"  # how an edge says a version may load later (the service retries)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    return isinstance(exc, RuntimeError) and "not enough memory" in str(exc)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write(
    path: Path, data: bytes, *, overwrite: bool = True, dir_mode: int = 0o777
) -> None:
    """``data`` written whole to ``path`` (a temp file of mode 0600, then renamed in: no
    reader sees part of it). ``overwrite`` False: FileExistsError if ``path`` exists, which
    is kept (a key file made by another process meanwhile); ``dir_mode``: of the folders
    made for it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=dir_mode)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def model_to_bytes(kind: str, arch: dict, model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(
        {
            "kind": kind,
            "arch": arch,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        },
        buf,
    )
    return buf.getvalue()


# architecture key -> the SecurityConfig field that bounds it
ARCH_BOUNDS = {"width": "max_width", "patch": "max_patch"}
ARCH_FLAGS = {"skip"}  # 0 or 1: a variant of the same size


def check_arch(kind: str, arch, security: SecurityConfig | None = None) -> dict:
    """The constructor arguments a model file declares, refused unless every key is one the
    network takes and every value an int within the configured bounds, so that a file
    cannot make us allocate a network of any size."""
    bounds = security or SecurityConfig()
    spec = model_kind(kind)
    if not isinstance(arch, dict):
        raise ModelFileError(f"architecture is a {type(arch).__name__}, not a dict")
    takes = set(inspect.signature(spec.build).parameters) & (set(ARCH_BOUNDS) | ARCH_FLAGS)
    for key, value in arch.items():
        if key not in takes:
            known = sorted(takes)
            raise ModelFileError(f"unknown {kind} architecture key {key!r}; known: {known}")
        if type(value) is not int:
            raise ModelFileError(f"architecture {key}={value!r} is not an integer")
        if key in ARCH_FLAGS:
            if value not in (0, 1):
                raise ModelFileError(f"architecture {key}={value} is not 0 or 1")
            continue
        limit = getattr(bounds, ARCH_BOUNDS[key])
        if not 1 <= value <= limit:
            raise ModelFileError(
                f"architecture {key}={value} outside 1..{limit} (security.{ARCH_BOUNDS[key]})"
            )
    return arch


def model_from_bytes(
    data: bytes, security: SecurityConfig | None = None
) -> tuple[nn.Module, dict]:
    """Build the network from checkpoint bytes; ModelFileError for anything unusable.

    Never runs code from the file (weights only); the declared architecture is checked
    against ``security``'s bounds before the network is built, and every tensor must match
    the built network's (strict)."""
    bounds = security or SecurityConfig()
    if len(data) > bounds.max_model_bytes:
        raise ModelFileError(
            f"model file of {len(data)} bytes exceeds security.max_model_bytes "
            f"({bounds.max_model_bytes})"
        )
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise _load_error(exc) from exc
    if not isinstance(ckpt, dict) or not {"kind", "arch", "state_dict"} <= set(ckpt):
        raise ModelFileError("model file does not load: not a checkpoint (kind, arch, state_dict)")
    try:
        arch = check_arch(ckpt["kind"], ckpt["arch"], bounds)
    except (ValueError, TypeError) as exc:  # an unknown (or unhashable) kind
        raise ModelFileError(f"model file does not load: {exc}") from exc
    try:
        model = model_kind(ckpt["kind"]).build(**arch)
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except Exception as exc:
        raise _load_error(exc) from exc
    return model.eval(), {"kind": ckpt["kind"], "arch": arch}


def _load_error(exc: Exception) -> ModelFileError:
    what = f"{type(exc).__name__}: {exc}"
    if is_transient(exc):
        return ModelUnavailable(f"model file could not be loaded now: {what}")
    return ModelFileError(f"model file does not load: {what}")


class Registry:
    """Every reader survives stray, truncated and wrongly shaped files: each is skipped with a
    warning (once per file and problem), never a crash."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        self._warned: set[tuple[str, str]] = set()

    def _warn(self, name: str, problem: str) -> None:
        if (name, problem) not in self._warned:
            self._warned.add((name, problem))
            log.warning("model registry %s: skipping %s: %s", self.root, name, problem)

    def _paths(self, version: int) -> tuple[Path, Path]:
        return self.root / f"v{version:04d}.pt", self.root / f"v{version:04d}.json"

    def versions(self) -> list[int]:
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.glob("v*.json"):
            match = VERSION_FILE.fullmatch(p.name)
            if match:
                found.append(int(match[1]))
            else:
                self._warn(p.name, "not a version file name (vNNNN.json)")
        return sorted(found)

    def add(self, data: bytes, meta: dict) -> int:
        """Store model bytes as the next version; returns the version number."""
        self.root.mkdir(parents=True, exist_ok=True)
        version = (self.versions() or [0])[-1] + 1
        model_path, meta_path = self._paths(version)
        while model_path.exists() or meta_path.exists():  # another writer took it
            version += 1
            model_path, meta_path = self._paths(version)
        atomic_write(model_path, data)
        record = dict(
            meta,
            version=version,
            sha256=sha256_bytes(data),
            size=len(data),
            created=meta.get("created", time.time()),
            file=model_path.name,
        )
        atomic_write(meta_path, json.dumps(record, indent=2).encode())
        return version

    def meta(self, version: int) -> dict:
        """The metadata of a version: ModelUnavailable if it cannot be read now, ModelFileError
        if it is not a JSON object."""
        path = self._paths(version)[1]
        try:
            text = path.read_text()
        except OSError as exc:
            raise ModelUnavailable(f"no readable metadata for model v{version}: {exc}") from exc
        try:
            meta = json.loads(text)
        except ValueError as exc:
            raise ModelFileError(f"metadata of model v{version} is not JSON: {exc}") from exc
        if not isinstance(meta, dict):
            raise ModelFileError(f"metadata of model v{version} is a {type(meta).__name__}")
        return meta

    def read_verified(self, version: int, security: SecurityConfig | None = None) -> bytes:
        """The bytes of a version, checked against its size bound (before reading) and its
        recorded sha256."""
        bounds = security or SecurityConfig()
        meta = self.meta(version)
        path = self._paths(version)[0]
        try:
            size = path.stat().st_size
            if size > bounds.max_model_bytes:
                raise ModelFileError(
                    f"model v{version} file of {size} bytes exceeds security.max_model_bytes "
                    f"({bounds.max_model_bytes}); not read"
                )
            data = path.read_bytes()
        except OSError as exc:
            raise ModelUnavailable(f"model v{version} file unreadable: {exc}") from exc
        if sha256_bytes(data) != meta.get("sha256"):
            raise ModelFileError(f"model v{version} fails its sha256 checksum (file corrupt)")
        return data

    def load(self, version: int, security: SecurityConfig | None = None) -> tuple[nn.Module, dict]:
        """Checksum, bounds, weights only: see :func:`model_from_bytes`."""
        meta = self.meta(version)
        model, info = model_from_bytes(self.read_verified(version, security), security)
        if meta.get("kind") not in (None, info["kind"]):
            raise ModelFileError(
                f"model v{version} is a {info['kind']} but its metadata says {meta['kind']!r}"
            )
        return model, dict(meta, **info)

    def _update_meta(self, version: int, **fields) -> None:
        """Rewrite a version's metadata with ``fields`` set (whole: atomic_write)."""
        meta = dict(self.meta(version), **fields)
        atomic_write(self._paths(version)[1], json.dumps(meta, indent=2).encode())

    def _set_status(self, version: int, status: str, reason: str = "") -> None:
        self._update_meta(version, status=status, status_reason=reason, status_time=time.time())

    def mark_accepted(self, version: int) -> None:
        """Record ``version`` as its kind's accepted one: in accepted.json (and its copy),
        then in its own metadata. Raises before anything is written when the record cannot
        be read (:class:`RegistryCorrupt`); a failed write leaves the last record whole."""
        accepted = self._accepted_all()
        kind = self.meta(version)["kind"]
        # oldest first; accepting a version already in it goes back to it (a rollback)
        history = accepted.get(kind, {}).get("history", [])
        history = history[: history.index(version)] if version in history else history
        accepted[kind] = {"version": version, "time": time.time(), "history": history + [version]}
        data = json.dumps(accepted, indent=2).encode()
        atomic_write(self.root / ACCEPTED, data)
        atomic_write(self.root / ACCEPTED_COPY, data)
        try:  # accepted.json is the record; the status in the metadata only mirrors it
            self._set_status(version, "accepted")
        except (OSError, ModelFileError) as exc:
            log.error("model v%d accepted, but its metadata not updated: %s", version, exc)

    def set_approval(self, version: int, approval: dict) -> None:
        """Store the gate's signed approval (edgeloop/approval.py) in the version's metadata."""
        self._update_meta(version, approval=approval)

    def set_pruned(self, version: int) -> None:
        """Its weights are about to be deleted by retention: the metadata stays, so marked."""
        self._update_meta(version, pruned=time.time())

    def mark_rejected(self, version: int, reason: str) -> None:
        self._set_status(version, "rejected", reason)

    def _read_accepted(self, name: str) -> tuple[dict | None, str | None]:
        """(the record, None), or (None, what is wrong with it); ({}, None) if absent."""
        try:
            data = json.loads((self.root / name).read_text())
        except FileNotFoundError:
            return None, "missing"
        except (OSError, ValueError) as exc:
            return None, f"unreadable ({exc})"
        if not isinstance(data, dict):
            return None, f"a {type(data).__name__}, not an object"
        for kind, entry in data.items():
            if not (
                isinstance(entry, dict)
                and type(entry.get("version")) is int
                and isinstance(entry.get("history", []), list)
                and all(type(v) is int for v in entry.get("history", []))
            ):
                return None, f"its entry {kind!r} is not a version and a history: {entry!r}"[:200]
        return data, None

    def _accepted_all(self) -> dict:
        """Which version of each kind was accepted. accepted.json, or the copy written with
        it when accepted.json is corrupt or gone (an error, logged once); RegistryCorrupt
        when neither can be read: nothing is then assumed accepted."""
        data, problem = self._read_accepted(ACCEPTED)
        if problem is None:
            return data
        copy, copy_problem = self._read_accepted(ACCEPTED_COPY)
        if problem == "missing" and copy_problem == "missing":
            return {}  # a new registry
        if copy_problem is None:
            if (ACCEPTED, problem) not in self._warned:
                self._warned.add((ACCEPTED, problem))
                log.error(
                    "model registry %s: %s is %s; using its copy %s (the next accepted model "
                    "rewrites both)",
                    self.root,
                    ACCEPTED,
                    problem,
                    ACCEPTED_COPY,
                )
            return copy
        raise RegistryCorrupt(
            f"model registry {self.root}: {ACCEPTED} is {problem} and its copy {ACCEPTED_COPY} "
            f"is {copy_problem}, so which models were accepted is unknown. Restore one of "
            "them (each version's status is in its vNNNN.json), or remove both to start "
            "from no accepted model"
        )

    def accepted_history(self, kind: str) -> list[int]:
        """The versions of this kind accepted so far, oldest first, the serving one last."""
        entry = self._accepted_all().get(kind)
        if entry is None:
            return []
        history = list(entry.get("history", []))
        return history if history[-1:] == [entry["version"]] else [*history, entry["version"]]

    def accepted(self, kind: str) -> int | None:
        """The version of this kind the edge accepted last (served after a restart)."""
        return self._accepted_all().get(kind, {}).get("version")

    def previous(self, kind: str) -> int | None:
        """The version of this kind accepted before the one serving now (rollback target)."""
        history = self.accepted_history(kind)
        return history[-2] if len(history) >= 2 else None

    def ranked(self, kind: str) -> list[int]:
        """The accepted versions of this kind that have their weights, lowest validation
        loss first."""
        found = []
        for v in self.versions():
            try:
                m = self.meta(v)
            except ModelFileError as exc:
                self._warn(self._paths(v)[1].name, str(exc))
                continue
            loss = m.get("val_loss")
            if m.get("status") != "accepted" or m.get("kind") != kind or m.get("pruned"):
                continue
            if type(loss) not in (int, float) or not math.isfinite(loss):
                self._warn(self._paths(v)[1].name, f"val_loss {loss!r} is not a number")
                continue
            found.append((loss, v))
        return [v for _, v in sorted(found)]

    def best(self, kind: str) -> int | None:
        """The accepted version of this kind with the lowest validation loss."""
        ranked = self.ranked(kind)
        return ranked[0] if ranked else None
