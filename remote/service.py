"""The retraining service: wires the ML IOC's records (ml_pvs.MlPvs), the executor slot
(executor_slot.ExecutorSlot), one retraining (pipeline.RetrainPipeline) and the retraining
policy (policy_watcher.PolicyWatcher) together, and decides when a retraining runs.

``RetrainService`` is what ``edgeloop retrain-service`` runs."""

from __future__ import annotations

import logging
import threading
import time

from p4p.client.thread import Context

from edgeloop import model_records, tiled_runs
from edgeloop.config import MODE_KIND, Config
from edgeloop.registry import Registry, RegistryCorrupt
from edgeloop.remote import flows, mlflow_registry, retention
from edgeloop.remote.errors import RetrainError
from edgeloop.remote.executor_slot import ExecutorSlot
from edgeloop.remote.executors import make_executor
from edgeloop.remote.heartbeat import Heartbeat
from edgeloop.remote.memory import release_freed_memory
from edgeloop.remote.ml_pvs import MlPvs
from edgeloop.remote.pipeline import RetrainPipeline
from edgeloop.remote.policy_watcher import PolicyWatcher
from edgeloop.remote.reference_monitor import ReferenceMonitor

log = logging.getLogger(__name__)

OPERATOR = "operator (ml:Retrain)"  # the trigger recorded for a write to ml:Retrain


class RetrainService:
    """Runs retraining on trigger; PVs in, PVs out.

    Triggers, each recorded with its source (``ml:Trigger``, ``ml:Message``, the model's
    metadata): ``$(P)ml:Retrain`` writes (the operator), a reason written to
    ``$(P)ml:Request`` or passed to :meth:`request` (e.g. the Bluesky ``RetrainTrigger``),
    and the retraining policy (remote/policy.py) while ``$(P)ml:AutoRetrain`` is On.  One
    retraining at a time; triggers meanwhile coalesce into one follow-up.
    ``$(P)ml:Abort`` cancels the running one in any state (it ends in Error, "... aborted by
    ml:Abort", and nothing is deployed); ``$(P)ml:Rollback`` serves the previously accepted
    model again; a write to ``$(P)ml:Endpoint`` picks the executor for the next run.  When
    the ML IOC restarts, the service writes its state back into it (the IOC's initial
    ml:Endpoint is not a request); a dead or stopped worker pool is replaced before the next
    task.
    """

    def __init__(
        self,
        cfg: Config,
        executor=None,
        step_timeout: float | None = None,
        input_pv: str | None = None,
    ):
        self.cfg = cfg
        self.input_pv = input_pv
        self.p = cfg.prefix
        if cfg.tiled.enabled:  # the tasks read runs through Tiled with the key, as its client does
            tiled_runs.use_key(cfg.tiled, cfg.data_path, create=not cfg.tiled.uri)
        self.registry = Registry(cfg.registry_path)
        self.ctx = Context("pva", nt=False)
        self.pvs = MlPvs(self.ctx, self.p)
        # held while a retraining, a rollback or an executor switch runs: one at a time
        self._busy = threading.Lock()
        # the retraining thread's life and the trigger it runs next, changed together (a
        # trigger never falls between its last look and its exit)
        self._triggers = threading.Lock()
        self._worker_alive = False
        self.slot = ExecutorSlot(cfg.executor, self._make_executor, executor)
        self.policy = PolicyWatcher(
            cfg, self.registry, self._busy.locked, self.request, keep=self.pvs.keep
        )
        self.pipeline = RetrainPipeline(
            cfg,
            self.registry,
            self.slot,
            self.pvs,
            deploy=self._deploy,
            on_staged=self.policy.trained,
            step_timeout=step_timeout,
        )
        self._stop = threading.Event()
        self.last_result: dict | None = None
        self.runs_finished = 0
        self.trigger = ""  # of the running (or last) retraining
        self._pending_trigger: str | None = None
        self._retraining = False
        self.reference: ReferenceMonitor | None = None
        self._heartbeat: Heartbeat | None = None

    def _make_executor(self, name: str):
        if name == "globus-flows":
            return flows.flows_executor(self.cfg)
        return make_executor(
            name, self.cfg.remote, run_dir=str(self.cfg.registry_path / "work" / "parsl")
        )

    @property
    def executor(self):
        return self.slot.executor

    @executor.setter
    def executor(self, executor) -> None:  # tests wrap the executor in a faulty one
        self.slot.executor = executor

    @property
    def executor_name(self) -> str:
        """The executor in use (ml:Endpoint, the design card's name for the record)."""
        return self.slot.name

    def _deploy(self, version: int) -> None:
        self.ctx.put(f"{self.p}edge:LoadModel", version, timeout=120, wait=True)

    # ---- triggers ------------------------------------------------------------------------
    def request(self, source: str = "request") -> bool:
        """Start retraining now (once a rollback or an executor switch in progress is
        done), or queue one follow-up if a retraining is running; ``source`` says who asked
        (recorded as the trigger). Every trigger is run, or replaced by a later one (said)."""
        with self._triggers:
            running, self._pending_trigger = self._worker_alive, source
            self._worker_alive = True
        if running:
            self.pvs.message(f"retraining already running; one follow-up queued ({source})")
            return False
        threading.Thread(target=self._run_queued, name="retrain", daemon=True).start()
        return True

    def _run_queued(self) -> None:
        try:
            self._run_triggers()
        except BaseException:  # a bug: the next trigger must still start a thread
            with self._triggers:
                self._worker_alive = False
            raise

    def _run_triggers(self) -> None:
        while True:
            with self._triggers:
                trigger, self._pending_trigger = self._pending_trigger, None
                if trigger is None or self._stop.is_set():
                    self._worker_alive = False
                    return
            with self._busy:
                self.pipeline.abort.clear()
                self.trigger, self._retraining = trigger, True
                try:
                    self.run_once()
                finally:
                    self._retraining = False
                self._prune()
                self._sync_mlflow()
                release_freed_memory()  # the run's peak, held by malloc otherwise
                self.runs_finished += 1

    def run_once(self) -> dict | None:
        """One retraining, its outcome in ml:Status and ml:Message."""
        try:
            result = self.pipeline.run(self.trigger)
        except RetrainError as exc:
            self.pvs.status("Error", str(exc))
            return None
        except Exception as exc:  # a bug must still end in Error, never a dead service
            log.exception("retraining failed")
            self.pvs.status("Error", f"retraining failed: {type(exc).__name__}: {exc}")
            return None
        timings = result["timings"]
        self.pvs.record("model_version", result["version"])
        self.pvs.publish_timings(timings)
        self.pvs.status(
            "Idle",
            f"{result['kind']} model v{result['version']} serving; val loss "
            f"{result['val_loss']:.4g}; "
            + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
            + f"; triggered by {self.trigger}"
            + (f"; {result['record_problem']}" if result.get("record_problem") else ""),
        )
        self.last_result = result
        return result

    def _reference_into_record(self, version: int, error: float, info: str) -> None:
        """The first reference error measured of a version goes into its model card (the
        record is written again and signed; later measurements stay in the PVs)."""
        if not self.cfg.records.enabled:
            return
        try:
            if model_records.recorded_reference(model_records.find(self.cfg, version)):
                return
            reference = {"error": error, "info": info, "time": time.time()}
            model_records.write_record(self.cfg, version, self.registry, reference)
        except (model_records.RecordError, ImportError, OSError, ValueError) as exc:
            log.warning("model v%d: reference error not put in its record: %s", version, exc)

    def _sync_mlflow(self) -> None:
        """MLflow's registry made to agree with the records (records.mlflow_uri), after
        each retraining, whatever its outcome; one that fails is caught up with next time."""
        if not self.cfg.records.mlflow_uri:
            return
        try:
            mlflow_registry.sync(self.cfg)
        except Exception as exc:  # the model serves either way
            log.error("MLflow at %s not updated: %s", self.cfg.records.mlflow_uri, exc)

    def _prune(self) -> None:
        try:
            retention.prune(self.cfg, self.registry)
        except Exception:  # housekeeping never stops the retraining thread
            log.exception("retention failed")

    def _watch_disk(self) -> None:
        while not self._stop.is_set():
            try:
                self.pvs.put("ml:DiskFree", round(retention.disk_free_gb(self.cfg), 2))
            except OSError as exc:
                log.error("ml:DiskFree: %s", exc)
            self._stop.wait(self.cfg.retention.disk_check_s)

    def abort(self) -> None:
        if self._busy.locked():
            log.warning("abort requested")
            with self._triggers:
                self._pending_trigger = None  # an abort also drops the queued follow-up
            self.pipeline.abort.set()
        else:
            self.pvs.message("nothing to abort: no retraining is running")

    def rollback(self) -> None:
        """After the running retraining, which then ends without deploying: a rollback
        is never undone by a model deployed over it."""
        if self._retraining:
            self.pvs.message("ml:Rollback: the running retraining stops without deploying")
            self.pipeline.abort.set()
        threading.Thread(target=self._rollback, name="rollback", daemon=True).start()

    def _rollback(self) -> None:
        with self._busy:
            self._roll_back()

    def _roll_back(self) -> None:
        try:
            kind = MODE_KIND[self._active_mode()]
            target = self.registry.previous(kind)
            if target is None:
                self.pvs.message(f"rollback: no earlier accepted {kind} model")
                return
            self._deploy(target)
        except Exception as exc:
            self.pvs.status("Error", f"rollback failed: {type(exc).__name__}: {exc}")
            return
        self.pvs.record("model_version", target)
        self.pvs.status("Idle", f"rolled back: {kind} model v{target} serving")

    def _active_mode(self) -> str:
        try:
            return str(self.ctx.get(f"{self.p}edge:Mode", timeout=2)["value"])
        except Exception:
            return self.cfg.mode

    def _switch_executor(self, name: str) -> None:
        with self._busy:  # never under a running retraining
            try:
                self.slot.switch(name)
            except Exception as exc:
                msg = f"executor {name!r} refused: {exc}; still using {self.executor_name}"
                self.pvs.status("Error", msg)
                self.pvs.put("ml:Endpoint", self.executor_name)
                return
        self.pvs.keep("ml:Endpoint", name)  # the PV holds it already
        self.pvs.message(f"executor now {name}")
        log.info("executor now %s", name)

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> RetrainService:
        self.pvs.put("ml:Endpoint", self.executor_name)
        try:
            self.pvs.put("ml:ModelVersion", self.registry.accepted(MODE_KIND[self.cfg.mode]) or 0)
            self.pvs.status("Idle", f"retraining service ready (executor {self.executor_name})")
        except RegistryCorrupt as exc:  # each retraining is refused until it is repaired
            self.pvs.status("Error", str(exc))
        watch = {
            "ml:Retrain": self.pvs.button("ml:Retrain", lambda: self.request(OPERATOR)),
            "ml:Request": self.pvs.request_watcher(self.request),
            **self.policy.callbacks(),
            "ml:Abort": self.pvs.button("ml:Abort", self.abort),
            "ml:Rollback": self.pvs.button("ml:Rollback", self.rollback),
            "ml:Endpoint": self.pvs.executor_watcher(
                lambda: self.executor_name, self._switch_executor
            ),
        }
        for name, callback in watch.items():
            self.pvs.monitor(name, callback)
        missing = self.pvs.wait_connected(10.0)  # a write from now on is seen
        if missing:
            log.warning("not connected yet (acted on once they are): %s", ", ".join(missing))
        for record, value in self.policy.saved_settings.items():  # the operator's, kept
            self.pvs.put(record, value)
        self.policy.trained_at_start()
        threading.Thread(
            target=self.policy.run, args=(self._stop,), name="policy", daemon=True
        ).start()
        threading.Thread(target=self._watch_disk, name="disk", daemon=True).start()
        self.reference = None
        if self.cfg.remote.reference:
            self.reference = ReferenceMonitor(
                self.cfg, self.ctx, self.registry, self.pvs.put, self.input_pv,
                on_measured=self._reference_into_record,
            )  # fmt: skip
            self.reference.start()
        # last: a beating service has made all of the above and its monitors are connected
        # (what starters wait for)
        self._heartbeat = Heartbeat(self.ctx, f"{self.p}ml:Heartbeat").start()
        return self

    def stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if self.reference is not None:
            self.reference.stop()
        self._stop.set()
        self.pipeline.abort.set()
        self.pvs.close()
        self.slot.shutdown()
        self.ctx.close()

    def serve_forever(self) -> None:
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
