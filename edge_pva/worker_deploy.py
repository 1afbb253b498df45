"""All or none: deploying a model version to an edge of N workers (the aggregate's
edge:LoadModel).

Every worker loads the version (its own LoadModel, all at once). Once all serve it, the
aggregate, the registry's one writer for the workers, records it accepted. If a worker
refuses or does not answer in time, or the record cannot be written, every worker is told
to withdraw it (its RevertModel, answered in order with its LoadModel, so a worker whose
load arrives late withdraws it right after loading it). The version is marked rejected only when
a worker found fault with the model itself; a timeout or a lack of memory says
"not loaded now" (the retraining service then deploys it again later).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from edgeloop.registry import NOT_NOW, ModelFileError, Registry, RegistryCorrupt

log = logging.getLogger(__name__)

REVERT_TIMEOUT_S = 10.0


class WorkerDeploy:
    def __init__(
        self,
        ctx,
        workers: dict[int, str],
        registry: Registry,
        message: Callable[..., None],
        timeout_s: float,
    ):
        self.ctx, self.workers, self.registry = ctx, workers, registry
        self.message, self.timeout_s = message, timeout_s

    def _put(self, field: str, version: int, timeout: float) -> dict[int, Exception]:
        """Write ``version`` to every worker's ``field`` at once: {worker: its error}. One
        put each: p4p's put of a list marks every put that succeeded as timed out when one
        times out (a success and a pending put both read None there)."""

        def put(prefix: str) -> Exception | None:
            try:
                self.ctx.put(f"{prefix}{field}", version, timeout=timeout)
            except Exception as exc:  # TimeoutError, or the worker's refusal (RemoteError)
                return exc
            return None

        with ThreadPoolExecutor(len(self.workers)) as pool:
            results = list(pool.map(put, self.workers.values()))
        return {k: r for k, r in zip(self.workers, results) if r is not None}

    def load(self, version: int) -> str | None:
        """None once every worker serves ``version`` and it is recorded, else why not (every
        worker then serves what it served before)."""
        refused = {
            f"w{k}": _why(e) for k, e in self._put("LoadModel", version, self.timeout_s).items()
        }
        if not refused:
            try:
                self.registry.mark_accepted(version)
                self.message(f"model v{version} serving on all {len(self.workers)} workers")
                return None
            except (OSError, RegistryCorrupt) as exc:
                refused = {"aggregate": f"recording it as accepted failed: {exc}"}
        faults = [why for why in refused.values() if f"model v{version} rejected:" in why]
        not_withdrawn = self._put("RevertModel", version, REVERT_TIMEOUT_S)
        transient = all(NOT_NOW in why for why in refused.values())
        verdict = NOT_NOW if transient else "rejected" if faults else "not loaded"
        if faults:
            try:
                self.registry.mark_rejected(version, faults[0][:300])
            except (OSError, ModelFileError):
                log.error("model v%d: marking it rejected failed", version, exc_info=True)
        msg = f"model v{version} {verdict}: refused by a worker ("
        msg += "; ".join(f"{who}: {why}" for who, why in refused.items())
        msg += "); withdrawn from every worker"
        late = [f"w{k}" for k, e in not_withdrawn.items() if isinstance(e, TimeoutError)]
        failed = [f"w{k}: {_why(e)}" for k, e in not_withdrawn.items() if f"w{k}" not in late]
        if late:
            msg += f" ({', '.join(late)} not answering: should the load reach it, so does this)"
        if failed:
            msg += f" except {'; '.join(failed)}"
        self.message(msg, severity=2)
        return msg[:500]


def _why(exc: Exception) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer ({NOT_NOW})"
    return str(exc)
