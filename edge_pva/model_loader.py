"""The models an edge serves: ``ModelLoader`` holds one model slot per kind (PtychoNN,
BraggNN), starts each from the registry's accepted version (or an untrained v0), and loads,
validates and swaps in a registry version on request; a version that fails is refused with
the reason, and the model serving keeps serving."""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

from edgeloop import approval
from edgeloop.config import MODE_KIND, Config
from edgeloop.edge_pva.inference import (
    ModelRejected,
    ModelSlot,
    ServedModel,
    check_backend,
    probe_inputs,
    served_model,
    untrained_model,
    validate,
)
from edgeloop.registry import (
    NOT_NOW,
    ModelFileError,
    ModelUnavailable,
    Registry,
    RegistryCorrupt,
    is_transient,
)

log = logging.getLogger(__name__)


class Unservable(ModelRejected):
    """A version never served again: rejected before (refused again, its first reason
    kept, not marked again) or pruned by retention (its weights deleted)."""


class ModelLoader:
    """``message(text, severity)`` hears each load's outcome; ``swapped(kind, version)``
    each model that now serves. ``records``: this loader writes the registry's record of
    accepted and rejected versions (an edge worker's does not: its aggregate is the one
    writer, and tells it to :meth:`revert` a version not every worker could load)."""

    def __init__(
        self,
        cfg: Config,
        registry: Registry,
        message: Callable[[str, int], None],
        swapped: Callable[[str, int], None],
        records: bool = True,
    ):
        self.cfg, self.registry, self.records = cfg, registry, records
        self._undo: dict[str, tuple[int, ServedModel]] = {}  # kind -> (loaded, served before)
        self.message, self.swapped = message, swapped
        # recent inputs of each kind: the probe batch a candidate model must pass
        self.recent = {k: collections.deque(maxlen=4) for k in MODE_KIND.values()}
        check_backend(cfg.edge.backend)  # one clear error before any model loads
        self.slots = {k: ModelSlot(self._initial_model(k)) for k in MODE_KIND.values()}

    def _validate(self, served: ServedModel) -> None:
        kind = served.spec.name
        validate(served, probe_inputs(kind, served.input_size, list(self.recent[kind])))

    def _initial_model(self, kind: str) -> ServedModel:
        """The accepted version of ``kind``, or the one accepted before it where that one is
        rejected or unusable, or an untrained v0. RegistryCorrupt (the record of accepted
        versions unreadable) is raised: the edge does not start on a guess."""
        history = self.registry.accepted_history(kind)
        for version in reversed(history):
            try:
                _, served = self._candidate(version, expected_kind=kind)
                log.info("serving %s model v%d from %s", kind, version, self.registry.root)
                return served
            except (ModelFileError, ModelRejected) as exc:
                log.error("accepted %s model v%d not served: %s", kind, version, exc)
        log.info(
            "no %s model to serve in %s: serving an untrained (random) model v0",
            kind,
            self.registry.root,
        )
        return untrained_model(self.cfg, kind)

    def _candidate(
        self, version: int, expected_kind: str | None = None
    ) -> tuple[str, ServedModel]:
        meta = self.registry.meta(version)
        if meta.get("pruned"):
            raise Unservable("its weights were deleted by retention ([retention] keep_best)")
        if meta.get("status") == "rejected":
            raise Unservable(
                f"it was rejected ({meta.get('status_reason') or 'no reason recorded'}); "
                "a rejected version is never served"
            )
        try:  # before a byte of it is read: only what the gate approved is served
            approval.check(approval.public_key(self.cfg.security), meta, version)
        except approval.GateKeyMissing as exc:
            raise ModelUnavailable(str(exc)) from exc
        except approval.ApprovalError as exc:
            raise ModelRejected(str(exc)) from exc
        model, meta = self.registry.load(version, self.cfg.security)
        kind = meta.get("kind")
        if kind not in (expected_kind or self.slots):
            raise ModelRejected(f"model kind {kind!r} is not served here ({sorted(self.slots)})")
        served = served_model(self.cfg, kind, version, model)
        self._validate(served)
        return kind, served

    def _candidate_now(self, version: int) -> tuple[str, ServedModel]:
        """:meth:`_candidate`, with an error of a resource (memory, I/O) as ModelUnavailable."""
        try:
            return self._candidate(version)
        except (ModelFileError, ModelRejected):
            raise
        except Exception as exc:
            if is_transient(exc):
                raise ModelUnavailable(f"{type(exc).__name__}: {exc}") from exc
            raise

    def _refused(self, version: int, exc: Exception) -> str:
        """What a refusal says; a version is marked rejected only for its own fault."""
        serving = ", ".join(f"{k} v{s.get().version}" for k, s in self.slots.items())
        if isinstance(exc, ModelUnavailable):
            return f"model v{version} {NOT_NOW} ({exc}); still serving {serving}"
        if isinstance(exc, Unservable):
            return f"model v{version} not loaded: {exc}; still serving {serving}"
        try:
            if self.records:
                self.registry.mark_rejected(version, str(exc))
        except (OSError, ModelFileError):
            log.error("model v%d: marking it rejected failed", version, exc_info=True)
        return f"model v{version} rejected: {exc}; still serving {serving}"

    def load_version(self, version: int) -> None:
        """Load, validate and swap in a registry version; raises with the reason if rejected,
        or if it cannot be loaded now (then it is not rejected: a later load may serve it)."""
        try:
            kind, served = self._candidate_now(version)
        except (ModelFileError, ModelRejected) as exc:
            msg = self._refused(version, exc)
            self.message(msg, 2)
            raise ModelRejected(msg) from exc
        try:  # recorded first: a restart serves what the record names
            if self.records:
                self.registry.mark_accepted(version)
        except (OSError, RegistryCorrupt) as exc:
            msg = f"model v{version} not deployed: recording it as accepted failed: {exc}"
            self.message(msg, 2)
            raise ModelRejected(msg) from exc
        old = self.slots[kind].swap(served)
        self._undo[kind] = (version, old)
        msg = f"{kind} model v{version} serving (was v{old.version})"
        log.info(msg)
        self.swapped(kind, version)
        self.message(msg, 0)

    def revert(self, version: int) -> str | None:
        """Serve again what served before ``version`` was loaded (it was not loaded by every
        worker); None once done or if ``version`` does not serve, else why not."""
        for kind, (loaded, before) in list(self._undo.items()):
            if loaded == version and self.slots[kind].get().version == version:
                self.slots[kind].swap(before)
                del self._undo[kind]
                self.swapped(kind, before.version)
                self.message(f"{kind} model v{version} withdrawn: v{before.version} serving", 1)
                return None
        if any(s.get().version == version for s in self.slots.values()):
            return f"model v{version} serves, but what served before it is not known here"
        return None
