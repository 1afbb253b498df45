"""Versioned model files on disk (core), shared by remote/ (writes candidates) and edge_pva/
(loads, validates, marks accepted).

Layout: ``<root>/v0001.pt`` (torch checkpoint: kind, arch, state_dict) beside
``<root>/v0001.json`` (metadata incl. sha256, kind); ``<root>/accepted.json`` names, per model
kind, the version the edge last accepted.  Version numbers are shared by all kinds.  Every
file is written to a temp name and renamed, so readers never see a half-written file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from edgeloop.models import kind as model_kind


class ModelFileError(RuntimeError):
    """A model file that is missing, corrupt, fails its checksum, or does not build."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def model_from_bytes(data: bytes) -> tuple[nn.Module, dict]:
    """Build the network from checkpoint bytes; ModelFileError for anything unusable."""
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        spec = model_kind(ckpt["kind"])
        model = spec.build(**ckpt["arch"])
        model.load_state_dict(ckpt["state_dict"])
    except Exception as exc:  # torch raises many types for a damaged file
        raise ModelFileError(f"model file does not load: {type(exc).__name__}: {exc}") from exc
    return model.eval(), {"kind": ckpt["kind"], "arch": ckpt["arch"]}


class Registry:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()

    def _paths(self, version: int) -> tuple[Path, Path]:
        return self.root / f"v{version:04d}.pt", self.root / f"v{version:04d}.json"

    def versions(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(p.stem[1:]) for p in self.root.glob("v[0-9]*.json"))

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
        try:
            return json.loads(self._paths(version)[1].read_text())
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"no readable metadata for model v{version}: {exc}") from exc

    def read_verified(self, version: int) -> bytes:
        meta = self.meta(version)
        try:
            data = self._paths(version)[0].read_bytes()
        except OSError as exc:
            raise ModelFileError(f"model v{version} file unreadable: {exc}") from exc
        if sha256_bytes(data) != meta.get("sha256"):
            raise ModelFileError(f"model v{version} fails its sha256 checksum (file corrupt)")
        return data

    def load(self, version: int) -> tuple[nn.Module, dict]:
        model, info = model_from_bytes(self.read_verified(version))
        return model, dict(self.meta(version), **info)

    def _set_status(self, version: int, status: str, reason: str = "") -> None:
        meta = dict(
            self.meta(version), status=status, status_reason=reason, status_time=time.time()
        )
        atomic_write(self._paths(version)[1], json.dumps(meta, indent=2).encode())

    def mark_accepted(self, version: int) -> None:
        self._set_status(version, "accepted")
        accepted = self._accepted_all()
        kind = self.meta(version)["kind"]
        # oldest first; accepting a version already in it goes back to it (a rollback)
        history = accepted.get(kind, {}).get("history", [])
        history = history[: history.index(version)] if version in history else history
        accepted[kind] = {"version": version, "time": time.time(), "history": history + [version]}
        atomic_write(self.root / "accepted.json", json.dumps(accepted, indent=2).encode())

    def mark_rejected(self, version: int, reason: str) -> None:
        self._set_status(version, "rejected", reason)

    def _accepted_all(self) -> dict:
        try:
            data = json.loads((self.root / "accepted.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def accepted(self, kind: str) -> int | None:
        """The version of this kind the edge accepted last (served after a restart)."""
        try:
            return int(self._accepted_all()[kind]["version"])
        except (KeyError, TypeError, ValueError):
            return None

    def previous(self, kind: str) -> int | None:
        """The version of this kind accepted before the one serving now (rollback target)."""
        history = self._accepted_all().get(kind, {}).get("history", [])
        return history[-2] if len(history) >= 2 else None

    def best(self, kind: str) -> int | None:
        """The accepted version of this kind with the lowest validation loss."""
        best, best_loss = None, float("inf")
        for v in self.versions():
            try:
                m = self.meta(v)
            except ModelFileError:
                continue
            loss = m.get("val_loss")
            if (
                m.get("status") == "accepted"
                and m.get("kind") == kind
                and loss is not None
                and loss < best_loss
            ):
                best, best_loss = v, loss
        return best
