"""The checks between a returned model and the edge, free of EPICS: ``ModelGate`` reads
the registry for what a training starts from (``usable_best``) and is compared with
(``serving``), validates a returned model here (checksum, signature for this request, bounds,
its held-out loss measured by the service), gates it against the serving model and signs the
version it passes (``approve``). Also here: ``Trained`` (what the training step hands on),
``is_number`` and ``fmt`` (a figure from an executor, for a message)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from edgeloop import approval, signing
from edgeloop.config import Config
from edgeloop.registry import (
    ModelFileError,
    ModelUnavailable,
    Registry,
    RegistryCorrupt,
    model_from_bytes,
    sha256_bytes,
)
from edgeloop.remote.errors import RetrainError
from edgeloop.remote.held_out import held_out_losses

log = logging.getLogger(__name__)


def is_number(x) -> bool:
    return type(x) in (int, float) and math.isfinite(x)


def fmt(x) -> str:
    return f"{x:.4g}" if is_number(x) else repr(x)[:40]


@dataclass
class Trained:
    """What the training step gives the rest: the versions it started from and is compared
    with, the serving model (the gate's baseline), the executor's result, and when the task
    was submitted and returned (perf_counter)."""

    best: int | None
    serving: int | None
    baseline: object
    request: dict
    result: dict
    submitted: float
    returned: float


class ModelGate:
    """The registry's side of a retraining for models of ``cfg``'s architectures."""

    def __init__(self, cfg: Config, registry: Registry):
        self.cfg, self.registry = cfg, registry

    def ref(self, name: str, version: int | None) -> dict:
        """A registry model by reference: path + checksum, verified where it is read."""
        if version is None:
            return {name: None, f"{name}_sha256": None}
        meta = self.registry.meta(version)
        return {name: str(self.registry.root / meta["file"]), f"{name}_sha256": meta["sha256"]}

    def signing_key(self) -> bytes:
        """The service's signing key; the default key file is created on first use."""
        try:
            return signing.load_key(self.cfg.security.signing_key_file, create_default=True)
        except signing.SigningError as exc:
            raise RetrainError(str(exc)) from exc

    def usable_best(self, kind: str) -> tuple[int | None, list[str]]:
        """The accepted model of this kind and of the configured architecture with the
        lowest validation loss that loads here (checksum, bounds, builds): (version or
        None, the better ones skipped, as "vN"). One of another architecture (the width or
        the decoder changed in the config) is not trained from: the next model is the
        configured one, trained from scratch."""
        skipped = []
        public = self.gate_key().public_key()
        for version in self.registry.ranked(kind):
            try:  # only what the gate approved: its weights go into the next model
                approval.check(public, self.registry.meta(version), version)
                _, info = self.registry.load(version, self.cfg.security)
                if info["arch"] != self.cfg.arch(kind):
                    raise ModelFileError(f"it is a {info['arch']}, not the configured network")
                return version, skipped
            except (ModelFileError, approval.ApprovalError) as exc:
                log.warning("not training from %s v%d: %s", kind, version, exc)
                skipped.append(f"v{version}")
        return None, skipped

    def serving(self, kind: str):
        """(version, model) of the serving model, the quality gate's baseline; (None, None)
        if none or if its file is corrupt (then nothing to compare with: warned).  A file
        that cannot be read now ends this run: a gate without its baseline would let any
        model through; so does a record of accepted versions that cannot be read."""
        try:
            version = self.registry.accepted(kind)
        except RegistryCorrupt as exc:
            raise RetrainError(f"cannot gate: {exc}") from exc
        if version is None:
            return None, None
        try:
            return version, self.registry.load(version, self.cfg.security)[0]
        except ModelUnavailable as exc:
            raise RetrainError(f"serving model unreadable, cannot gate: {exc}") from exc
        except ModelFileError as exc:
            log.warning("serving %s v%d unusable as baseline: %s", kind, version, exc)
            return None, None

    def validate(self, trained: Trained, kind: str, key: bytes, labels: dict, train_cfg):
        """Checks a returned model and computes the gate's figures here: the executor's word
        is taken for nothing but its signed bytes, signed for this very request.  Returns
        the metadata figures."""
        result, request, baseline = trained.result, trained.request, trained.baseline
        if sha256_bytes(result["model"]) != result["sha256"]:
            raise RetrainError("returned model fails its checksum (corrupted in transit)")
        asked = {  # what this service asked for, not what the result says it was asked
            "kind": kind,
            "request_id": request["request_id"],
            "labels_sha256": request["labels_sha256"],
            "init_sha256": request.get("init_sha256"),
        }
        try:
            signing.verify(key, result["model"], dict(result, **asked), result.get("signature"))
            model, info = model_from_bytes(result["model"], self.cfg.security)
        except (signing.SigningError, ModelFileError) as exc:
            raise RetrainError(f"returned model refused: {exc}") from exc
        if info["kind"] != kind or info["arch"] != result["arch"]:
            raise RetrainError(f"returned model is a {info}, not the {kind} {result['arch']}")
        try:
            losses = held_out_losses(
                {"candidate": model, "baseline": baseline},
                labels["labels"],
                labels["sha256"],
                kind,
                train_cfg,
            )
        except (OSError, ValueError, KeyError) as exc:
            raise RetrainError(
                f"cannot evaluate the returned model on the held-out set here: {exc} "
                "(the labels file must be readable by the service)"
            ) from exc
        if not math.isfinite(losses["candidate"]):
            raise RetrainError(f"held-out loss of the returned model is {losses['candidate']}")
        reported = result["val_loss"]  # None: trained without labels (the physics loss)
        if reported is not None and not (
            is_number(reported) and math.isclose(reported, losses["candidate"], rel_tol=0.01)
        ):
            log.warning(
                "the executor reported held-out loss %r, the service measures %.6g",
                reported,
                losses["candidate"],
            )
        return {
            "val_loss": losses["candidate"],
            "baseline_val_loss": losses["baseline"],
            "executor_val_loss": reported,
            "executor_baseline_val_loss": result.get("baseline_val_loss"),
        }

    def gate_key(self):
        """The gate's private key (created with its public half on first use)."""
        try:
            return approval.private_key(self.cfg.security)
        except approval.ApprovalError as exc:
            raise RetrainError(str(exc)) from exc

    def approve(self, version: int, trained: Trained, labels: dict) -> None:
        """Sign the version the gate passed: the edge serves nothing else."""
        meta = self.registry.meta(version)
        fields = {
            "version": version,
            "kind": meta["kind"],
            "arch": meta["arch"],
            "sha256": meta["sha256"],
            "size": meta["size"],
            "parent": trained.best,
            "request_id": trained.request["request_id"],
            "labels": labels["labels"],
            "labels_sha256": labels["sha256"],
        }
        self.registry.set_approval(version, approval.approve(self.gate_key(), fields))

    def quality_gate(self, version: int, figures: dict) -> None:
        """The new model must not be worse than the serving one on the same held-out set, by
        the service's own figures."""
        baseline = figures["baseline_val_loss"]
        if baseline is None:
            return
        limit = baseline * (1.0 + self.cfg.remote.quality_margin)
        if figures["val_loss"] > limit:
            reason = (
                f"quality gate: held-out loss {figures['val_loss']:.4g} (measured by the "
                f"service; the executor reported {fmt(figures['executor_val_loss'])}) > "
                f"serving model's {baseline:.4g} + {self.cfg.remote.quality_margin:.0%}"
            )
            self.registry.mark_rejected(version, reason)
            raise RetrainError(f"model v{version} not deployed: {reason}")
