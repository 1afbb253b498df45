"""The models an edge serves: ``ModelLoader`` holds one model slot per kind (PtychoNN,
BraggNN), starts each from the registry's accepted version (or an untrained v0), and loads,
validates and swaps in a registry version on request; a version that fails is refused with
the reason, and the model serving keeps serving."""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

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
from edgeloop.registry import ModelFileError, ModelUnavailable, Registry, RegistryCorrupt

log = logging.getLogger(__name__)


class ModelLoader:
    """``message(text, severity)`` hears each load's outcome; ``swapped(kind, version)``
    each model that now serves."""

    def __init__(
        self,
        cfg: Config,
        registry: Registry,
        message: Callable[[str, int], None],
        swapped: Callable[[str, int], None],
    ):
        self.cfg, self.registry = cfg, registry
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
        if meta.get("status") == "rejected":
            raise ModelUnavailable(
                f"it was rejected ({meta.get('status_reason') or 'no reason recorded'}); "
                "a rejected version is never served"
            )
        model, meta = self.registry.load(version, self.cfg.security)
        kind = meta.get("kind")
        if kind not in (expected_kind or self.slots):
            raise ModelRejected(f"model kind {kind!r} is not served here ({sorted(self.slots)})")
        served = served_model(self.cfg, kind, version, model)
        self._validate(served)
        return kind, served

    def load_version(self, version: int) -> None:
        """Load, validate and swap in a registry version; raises with the reason if rejected."""
        try:
            kind, served = self._candidate(version)
        except (ModelFileError, ModelRejected) as exc:
            serving = ", ".join(f"{k} v{s.get().version}" for k, s in self.slots.items())
            msg = f"model v{version} rejected: {exc}; still serving {serving}"
            log.error(msg)
            if not isinstance(exc, ModelUnavailable):  # a transient error rejects nothing
                try:
                    self.registry.mark_rejected(version, str(exc))
                except ModelFileError:
                    pass
            self.message(msg, 2)
            raise ModelRejected(msg) from exc
        try:  # recorded first: a restart serves what the record names
            self.registry.mark_accepted(version)
        except (OSError, RegistryCorrupt) as exc:
            msg = f"model v{version} not deployed: recording it as accepted failed: {exc}"
            self.message(msg, 2)
            raise ModelRejected(msg) from exc
        old = self.slots[kind].swap(served)
        msg = f"{kind} model v{version} serving (was v{old.version})"
        log.info(msg)
        self.swapped(kind, version)
        self.message(msg, 0)
