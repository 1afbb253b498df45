"""The retraining service: watches $(P)ml:Retrain, runs stage -> analyze -> train ->
validate -> deploy on the configured executor, and reports every step in $(P)ml:*.

The technique of the newest scan decides what is retrained: PtychoNN on phase-retrieval
labels for ptychography, BraggNN on pseudo-Voigt-fit labels for HEDM."""

from __future__ import annotations

import collections
import json
import logging
import math
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout

from p4p.client.thread import Context, Disconnected

from edgeloop import signing
from edgeloop.config import MODE_KIND, MODE_TECHNIQUE, Config, search_hint
from edgeloop.registry import (
    ModelFileError,
    ModelUnavailable,
    Registry,
    model_from_bytes,
    sha256_bytes,
)
from edgeloop.remote import tasks
from edgeloop.remote.executors import lost_worker, make_executor, stoppable
from edgeloop.remote.heartbeat import Heartbeat
from edgeloop.remote.policy import RetrainPolicy, Settings, quality_during
from edgeloop.remote.quality import held_out_losses
from edgeloop.remote.reference_monitor import ReferenceMonitor
from edgeloop.remote.staging import code_version, stage
from edgeloop.scanfile import POSITIONS, list_scans, read_scan, scan_summary

log = logging.getLogger(__name__)

STATES = ["Idle", "Staging", "Analyzing", "Training", "Validating", "Deploying", "Error"]
# coarse $(P)ml:Progress (%) at the start of each state; Error keeps the last value
PROGRESS = {
    "Idle": 100.0,
    "Staging": 0.0,
    "Analyzing": 5.0,
    "Training": 35.0,
    "Validating": 90.0,
    "Deploying": 95.0,
}


class RetrainError(RuntimeError):
    pass


def usable_scans(data_dir) -> list[tuple[str, str, int]]:
    """(path, technique, frames) of the complete, consistent scans with at least 4 frames,
    newest first; the first one's technique is what the beamline is doing now.  A truncated,
    incomplete or inconsistent scan is skipped with a warning."""
    out = []
    for path in reversed(list_scans(data_dir)):
        try:
            technique, n = scan_summary(path)
        except (OSError, KeyError, ValueError) as exc:
            log.warning("skipping scan %s: %s", path, exc)
            continue
        if n >= 4:
            out.append((str(path), technique, n))
    return out


def stage_scans(scans: list[tuple[str, str, int]], technique: str, max_frames: int) -> list[str]:
    """Of :func:`usable_scans`, the newest of a technique whose frames add up to at most
    max_frames (at least one scan), oldest first."""
    chosen, total = [], 0
    for path, kind, n in scans:
        if kind != technique:
            continue
        if chosen and total + n > max_frames:
            break
        chosen.append(path)
        total += n
    return list(reversed(chosen))


class Aborted(RetrainError):
    pass


OPERATOR = "operator (ml:Retrain)"  # the trigger recorded for a write to ml:Retrain

# reset by the service, not state it keeps
BUTTONS = ("ml:Retrain", "ml:Abort", "ml:Rollback")

TIMING_PVS = {
    "staging_s": "ml:StagingTime",
    "analysis_s": "ml:AnalysisTime",
    "training_s": "ml:TrainingTime",
    "return_s": "ml:ReturnTime",
    "end_to_end_s": "ml:EndToEndTime",
}


def _number(x) -> bool:
    return type(x) in (int, float) and math.isfinite(x)


def _fmt(x) -> str:
    return f"{x:.4g}" if _number(x) else repr(x)[:40]


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

    def __init__(self, cfg: Config, executor=None, step_timeout: float | None = None):
        self.cfg = cfg
        self.p = cfg.prefix
        self.registry = Registry(cfg.registry_path)
        self.endpoint = cfg.executor
        self.executor = executor or self._make_executor(cfg.executor)
        self._step_timeout = step_timeout
        self.ctx = Context("pva", nt=False)
        self._busy = threading.Lock()
        self._pending = False
        self._abort = threading.Event()
        self._stop = threading.Event()
        self._subs: list = []
        self.last_result: dict | None = None
        self.runs_finished = 0
        self._state: dict = {}  # what the service last wrote to each of its PVs
        self._state_lock = threading.Lock()
        self._ioc_lost = False  # ml:Endpoint disconnected: the next value is the IOC's own
        self._ioc_seen = False
        self._stale = False  # shut down, and no fresh one could be started yet
        self._step = "Idle"
        self.trigger = ""  # of the running (or last) retraining
        self._pending_trigger = ""
        self.policy = RetrainPolicy(cfg.policy)
        self._policy_lock = threading.Lock()
        self._settings = Settings.of(cfg.policy)  # the IOC's values once connected
        # edge:ScanConsistency as posted: (time stamp, value), newest last
        self._edge_quality: collections.deque = collections.deque(maxlen=4000)
        self._known_scans: set[str] = set()
        self._request_fresh = True  # the first ml:Request value after connecting is old
        self.reference: ReferenceMonitor | None = None
        self._heartbeat: Heartbeat | None = None

    def _make_executor(self, name: str):
        return make_executor(
            name, self.cfg.remote, run_dir=str(self.cfg.registry_path / "work" / "parsl")
        )

    # ---- PV helpers ----------------------------------------------------------------------
    def _put(self, name: str, value) -> None:
        """Write one of the service's PVs, and keep the value to write again when the IOC
        comes back from a restart."""
        with self._state_lock:
            if name not in BUTTONS:
                self._state[name] = value
            self._write(name, value)

    def _write(self, name: str, value) -> None:
        try:
            self.ctx.put(f"{self.p}{name}", value, timeout=5)
        except Exception as exc:
            log.error("cannot write %s%s: %s (%s)", self.p, name, exc, search_hint())

    def _restore(self) -> None:
        with self._state_lock:
            for name, value in self._state.items():
                self._write(name, value)
        if self._ioc_seen:
            log.warning("the ML IOC is back: its state written again (%s)", ", ".join(self._state))
        self._ioc_seen = True

    def _status(self, state: str, message: str | None = None) -> None:
        self._step = state
        self._put("ml:Status", {"value.index": STATES.index(state)})
        if state in PROGRESS:
            self._put("ml:Progress", PROGRESS[state])
        if message is not None:
            log.log(logging.ERROR if state == "Error" else logging.INFO, "%s: %s", state, message)
            self._put("ml:Message", message[:500])

    # ---- triggers ------------------------------------------------------------------------
    def _button(self, name: str, action):
        """Monitor callback of a bo 'button': on 1, reset it and run ``action``."""

        def on_value(value) -> None:
            if isinstance(value, Exception) or int(value["value.index"]) != 1:
                return
            threading.Thread(
                target=self._put, args=(name, {"value.index": 0}), daemon=True
            ).start()
            action()

        return on_value

    def abort(self) -> None:
        if self._busy.locked():
            log.warning("abort requested")
            self._pending = False  # an abort also drops the queued follow-up
            self._abort.set()
        else:
            self._put("ml:Message", "nothing to abort: no retraining is running")

    def rollback(self) -> None:
        threading.Thread(target=self._rollback, name="rollback", daemon=True).start()

    def _rollback(self) -> None:
        try:
            kind = MODE_KIND[self._active_mode()]
            target = self.registry.previous(kind)
            if target is None:
                self._put("ml:Message", f"rollback: no earlier accepted {kind} model")
                return
            self.ctx.put(f"{self.p}edge:LoadModel", target, timeout=120, wait=True)
        except Exception as exc:
            self._status("Error", f"rollback failed: {type(exc).__name__}: {exc}")
            return
        self._put("ml:ModelVersion", target)
        self._status("Idle", f"rolled back: {kind} model v{target} serving")

    def _active_mode(self) -> str:
        try:
            return str(self.ctx.get(f"{self.p}edge:Mode", timeout=2)["value"])
        except Exception:
            return self.cfg.mode

    def _on_endpoint(self, value) -> None:
        if isinstance(value, Disconnected):
            self._ioc_lost = True
            return
        if isinstance(value, Exception):
            return
        if self._ioc_lost:
            # the first value after a (re)connection is what the IOC started with (after a
            # restart its db default), not an operator's choice: write our state back
            self._ioc_lost = False
            threading.Thread(target=self._restore, name="restore", daemon=True).start()
            return
        name = str(value["value"]).strip()
        if name == self.endpoint:
            return
        threading.Thread(target=self._switch_executor, args=(name,), daemon=True).start()

    def _switch_executor(self, name: str) -> None:
        with self._busy:  # never under a running retraining
            try:
                executor = self._make_executor(name)
            except Exception as exc:
                msg = f"endpoint {name!r} refused: {exc}; still using {self.endpoint}"
                self._status("Error", msg)
                self._put("ml:Endpoint", self.endpoint)
                return
            old, self.executor, self.endpoint = self.executor, executor, name
            self._stale = False
        self._shut(old)
        with self._state_lock:  # the PV holds it already; written back after an IOC restart
            self._state["ml:Endpoint"] = name
        self._put("ml:Message", f"executor now {name}")
        log.info("executor now %s", name)

    def request(self, source: str = "request") -> bool:
        """Start retraining now, or queue one follow-up if a retraining is running;
        ``source`` says who asked (recorded as the trigger)."""
        if not self._busy.acquire(blocking=False):
            self._pending = True
            self._pending_trigger = source
            self._put("ml:Message", f"retraining already running; one follow-up queued ({source})")
            return False
        self._pending_trigger = source
        threading.Thread(target=self._run_locked, name="retrain", daemon=True).start()
        return True

    def _on_request(self, value) -> None:
        """``ml:Request``: any write of a non-empty reason is a trigger with that source."""
        if isinstance(value, Disconnected):
            self._request_fresh = True
            return
        if isinstance(value, Exception):
            return
        if self._request_fresh:  # what the record held before we connected: not a request
            self._request_fresh = False
            return
        reason = str(value["value"]).strip()
        if reason:
            self.request(f"{reason} (ml:Request)")

    def _run_locked(self) -> None:
        try:
            while True:
                self._pending = False
                self._abort.clear()
                self.trigger = self._pending_trigger
                self.run_once()
                self.runs_finished += 1
                if not self._pending or self._stop.is_set():
                    break
        finally:
            self._busy.release()

    # ---- the pipeline --------------------------------------------------------------------
    @property
    def step_timeout(self) -> float:
        return self._step_timeout or self.cfg.remote.task_timeout_s

    def _check_abort(self) -> None:
        if self._abort.is_set():
            step = "retraining" if self._step in ("Idle", "Error") else self._step.lower()
            raise Aborted(f"{step} aborted by ml:Abort")

    def _enter(self, state: str, message: str) -> None:
        """The next step, unless an abort came during the last one."""
        self._check_abort()
        self._status(state, message)

    def _wait(self, future, what: str):
        deadline = time.monotonic() + self.step_timeout
        while True:
            if self._abort.is_set():
                self._cancel(future)
                raise Aborted(f"{what} aborted by ml:Abort")
            if time.monotonic() > deadline:
                self._cancel(future)
                raise RetrainError(
                    f"{what} exceeded its time limit of "
                    f"{self.step_timeout:.0f} s (remote.task_timeout_s)"
                )
            try:
                return future.result(timeout=0.2)
            except FutureTimeout:
                continue
            except Exception as exc:
                lost = lost_worker(self.executor, exc)
                if getattr(self.executor, "broken", False):
                    self._renew_executor()
                if lost is not None:
                    raise RetrainError(f"{what} failed: {lost}") from exc
                raise RetrainError(f"{what} failed: {type(exc).__name__}: {exc}") from exc

    def _cancel(self, future) -> None:
        """Stop a running task by shutting its executor down (the local worker is
        terminated, Parsl's blocks are cancelled) and starting a fresh one.  A remote task
        that cannot be stopped is abandoned (its result is never used)."""
        try:
            if future.cancel():
                return
        except NotImplementedError:  # Parsl's AppFuture
            pass
        if stoppable(self.executor):
            self._renew_executor()

    def _shut(self, executor) -> None:
        try:
            executor.shutdown(wait=False, cancel_futures=True)
        except Exception:
            log.exception("stopping the executor failed")

    def _renew_executor(self, must: bool = False) -> None:
        """Shut the executor down and start a fresh one; if that fails, the next run tries
        again (``must``: raise instead)."""
        self._shut(self.executor)
        self._stale = True
        try:
            self.executor = self._make_executor(self.endpoint)
        except Exception as exc:
            if must:
                raise RetrainError(f"cannot start the {self.endpoint} executor: {exc}") from exc
            log.exception("cannot start the %s executor", self.endpoint)
            return
        self._stale = False

    def _ready_executor(self) -> None:
        """A fresh executor if starting one failed before or its worker died while idle."""
        if getattr(self.executor, "broken", False):
            lost = self.executor.dead_worker() or "its worker died"
            log.warning("executor %s: %s; starting a new one", self.endpoint, lost)
        if self._stale or getattr(self.executor, "broken", False):
            self._renew_executor(must=True)

    def _analysis_request(self, kind: str, scans: list[str]) -> tuple[str, dict]:
        """(what the analysis is, in words; its request)."""
        cfg = self.cfg
        out = cfg.registry_path / "work" / f"labels_{kind}_{int(time.time())}.h5"
        request = {"scans": scans, "kind": kind, "out": str(out)}
        if kind == "braggnn":
            request.update(
                patch=cfg.model.patch,
                sigma=cfg.edge.peak_sigma,
                min_separation=cfg.edge.peak_min_separation,
            )
            return "pseudo-Voigt peak fits", request
        request.update(
            pixel_um=cfg.sim.pixel_um,
            probe={"radius_px": cfg.sim.probe_radius_px, "defocus": cfg.sim.probe_defocus},
            epochs=cfg.train.recon_epochs,
            algorithm=cfg.train.recon_algorithm,
            threads=cfg.train.threads,
            input_size=cfg.model.input_size,
            # labels of scans seen before are reused; with Globus staging the endpoint's
            # filesystem is not ours, so it labels everything
            cache_dir=str(cfg.registry_path / "work" / "labels_cache")
            if cfg.remote.staging == "shared"
            else None,
        )
        return f"phase retrieval ({cfg.train.recon_algorithm})", request

    def run_once(self) -> dict | None:
        cfg = self.cfg
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        try:
            key = self._signing_key()  # a missing key fails now, not after the training
            self._ready_executor()
            self._enter("Staging", f"staging scans from {cfg.data_path}; trigger: {self.trigger}")
            t0 = time.perf_counter()
            available = usable_scans(cfg.data_path)
            if not available:
                raise RetrainError(f"no scans to train on in {cfg.data_path}")
            technique = available[0][1]
            mode = {t: m for m, t in MODE_TECHNIQUE.items()}[technique]
            kind = MODE_KIND[mode]
            train_cfg = cfg.training(kind)
            scans = stage_scans(available, technique, train_cfg.max_frames)
            self._note_trained(technique, scans)
            self._put("ml:Trigger", self.trigger[:250])
            log.info("retraining %s on %d scan(s) (%s)", kind, len(scans), self.trigger)
            scans = stage(scans, cfg)
            timings["staging_s"] = time.perf_counter() - t0

            what, request = self._analysis_request(kind, scans)
            self._enter("Analyzing", f"{what} on {len(scans)} {technique} scan(s)")
            labels = self._wait(self.executor.submit(tasks.analyze, request), what)
            timings["analysis_s"] = labels["seconds"]

            best, skipped = self.usable_best(kind)
            serving, baseline = self._serving(kind)
            self._enter(
                "Training",
                f"training {kind} on {labels['n_frames']} samples from "
                f"{f'v{best}' if best else 'scratch'} "
                + (f"(unusable, skipped: {', '.join(skipped)}) " if skipped else "")
                + f"({self.endpoint})",
            )
            t0 = time.perf_counter()
            result = self._wait(
                self.executor.submit(
                    tasks.train_model,
                    {
                        "labels": labels["labels"],
                        "labels_sha256": labels["sha256"],
                        **self._ref("init", best),
                        **self._ref("baseline", serving),
                        "kind": kind,
                        "arch": cfg.arch(kind),
                        "train": vars(train_cfg),
                        # the path, never the key: the endpoint reads its own copy
                        "signing_key_file": cfg.security.signing_key_file,
                        "security": {
                            k: getattr(cfg.security, k)
                            for k in ("max_model_bytes", "max_width", "max_patch")
                        },
                    },
                ),
                "training",
            )
            timings["training_s"] = result["seconds"]
            t_returned = time.perf_counter()

            self._enter("Validating", "checking the returned model")
            figures = self._validate(result, kind, key, labels, baseline, train_cfg)
            self._check_abort()
            meta = {
                "kind": kind,
                "arch": result["arch"],
                **figures,
                "baseline": serving,
                "skipped_frames": labels.get("skipped_frames", 0),
                "signature": result.get("signature"),
                "trained_on": scans,
                "labels_sha256": labels["sha256"],
                "n_frames": result["n_frames"],
                "parent": best,
                "history": result["history"],
                "timings": timings,
                "executor": self.endpoint,
                "trigger": self.trigger,
                "code_version": code_version(),
            }
            version = self.registry.add(result["model"], meta)
            self._put("ml:ValLoss", figures["val_loss"])
            self._quality_gate(version, figures)

            self._enter("Deploying", f"deploying model v{version}")
            try:
                self.ctx.put(f"{self.p}edge:LoadModel", version, timeout=120, wait=True)
            except Exception as exc:
                raise RetrainError(f"edge refused model v{version}: {exc}") from exc
            if self._abort.is_set():  # came while the edge was loading it
                raise Aborted(f"deploying aborted by ml:Abort: {self._withdraw(version, serving)}")
            # return: from the end of training (remote) to serving here; the task's own
            # clock does not see queueing and result transfer, so that is included
            timings["return_s"] = (
                time.perf_counter() - t_returned + max(0.0, t_returned - t0 - result["seconds"])
            )
            timings["end_to_end_s"] = time.perf_counter() - t_start
            self._put("ml:ModelVersion", version)
            self._publish_timings(timings)
            self._status(
                "Idle",
                f"{kind} model v{version} serving; val loss "
                f"{figures['val_loss']:.4g}; "
                + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
                + f"; triggered by {self.trigger}",
            )
            self.last_result = {
                "version": version,
                "kind": kind,
                "val_loss": figures["val_loss"],
                "timings": timings,
                "trigger": self.trigger,
            }
            return self.last_result
        except RetrainError as exc:
            self._status("Error", str(exc))
        except Exception as exc:  # a bug must still end in Error, never a dead service
            log.exception("retraining failed")
            self._status("Error", f"retraining failed: {type(exc).__name__}: {exc}")
        return None

    def _withdraw(self, version: int, serving: int | None) -> str:
        """Take a model the edge loaded before an abort out of service again: the one
        serving before goes back, the new one is marked rejected (never served again)."""
        if serving is None:
            self._put("ml:ModelVersion", version)
            return f"v{version} was loaded already and stays: no earlier model to go back to"
        try:
            self.ctx.put(f"{self.p}edge:LoadModel", serving, timeout=120, wait=True)
        except Exception as exc:
            self._put("ml:ModelVersion", version)
            return f"v{version} was loaded already and stays: v{serving} failed to load: {exc}"
        self.registry.mark_rejected(version, "withdrawn: ml:Abort came while it was deploying")
        self._put("ml:ModelVersion", serving)
        return f"v{version} withdrawn, v{serving} serving again"

    def _ref(self, name: str, version: int | None) -> dict:
        """A registry model by reference: path + checksum, verified where it is read."""
        if version is None:
            return {name: None, f"{name}_sha256": None}
        meta = self.registry.meta(version)
        return {name: str(self.registry.root / meta["file"]), f"{name}_sha256": meta["sha256"]}

    def _signing_key(self) -> bytes:
        """The service's signing key; the default key file is created on first use."""
        try:
            return signing.load_key(self.cfg.security.signing_key_file, create_default=True)
        except signing.SigningError as exc:
            raise RetrainError(str(exc)) from exc

    def usable_best(self, kind: str) -> tuple[int | None, list[str]]:
        """The accepted model of this kind with the lowest validation loss that loads here
        (checksum, bounds, builds): (version or None, the better ones skipped, as "vN")."""
        skipped = []
        for version in self.registry.ranked(kind):
            try:
                self.registry.load(version, self.cfg.security)
                return version, skipped
            except ModelFileError as exc:
                log.warning("not training from %s v%d: %s", kind, version, exc)
                skipped.append(f"v{version}")
        return None, skipped

    def _serving(self, kind: str):
        """(version, model) of the serving model, the quality gate's baseline; (None, None)
        if none or if its file is corrupt (then nothing to compare with: warned).  A file
        that cannot be read now ends this run: a gate without its baseline would let any
        model through."""
        version = self.registry.accepted(kind)
        if version is None:
            return None, None
        try:
            return version, self.registry.load(version, self.cfg.security)[0]
        except ModelUnavailable as exc:
            raise RetrainError(f"serving model unreadable, cannot gate: {exc}") from exc
        except ModelFileError as exc:
            log.warning("serving %s v%d unusable as baseline: %s", kind, version, exc)
            return None, None

    def _validate(self, result: dict, kind: str, key: bytes, labels: dict, baseline, train_cfg):
        """Checks a returned model and computes the gate's figures here: the endpoint's word
        is taken for nothing but its signed bytes.  Returns the metadata figures."""
        if sha256_bytes(result["model"]) != result["sha256"]:
            raise RetrainError("returned model fails its checksum (corrupted in transit)")
        try:
            signing.verify(key, result["model"], dict(result, kind=kind), result.get("signature"))
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
        reported = result["val_loss"]
        if not (_number(reported) and math.isclose(reported, losses["candidate"], rel_tol=0.01)):
            log.warning(
                "endpoint reported held-out loss %r, the service measures %.6g",
                reported,
                losses["candidate"],
            )
        return {
            "val_loss": losses["candidate"],
            "baseline_val_loss": losses["baseline"],
            "endpoint_val_loss": reported,
            "endpoint_baseline_val_loss": result.get("baseline_val_loss"),
        }

    def _quality_gate(self, version: int, figures: dict) -> None:
        """The new model must not be worse than the serving one on the same held-out set, by
        the service's own figures."""
        baseline = figures["baseline_val_loss"]
        if baseline is None:
            return
        limit = baseline * (1.0 + self.cfg.remote.quality_margin)
        if figures["val_loss"] > limit:
            reason = (
                f"quality gate: held-out loss {figures['val_loss']:.4g} (measured by the "
                f"service; the endpoint reported {_fmt(figures['endpoint_val_loss'])}) > "
                f"serving model's {baseline:.4g} + {self.cfg.remote.quality_margin:.0%}"
            )
            self.registry.mark_rejected(version, reason)
            raise RetrainError(f"model v{version} not deployed: {reason}")

    def _publish_timings(self, timings: dict) -> None:
        for key, pv in TIMING_PVS.items():
            if key in timings:
                self._put(pv, timings[key])
        log.info(
            "retraining timings: %s", json.dumps({k: round(v, 2) for k, v in timings.items()})
        )

    # ---- the retraining policy ------------------------------------------------------------
    def _setting(self, name: str, convert):
        """Monitor callback keeping one of the policy's live settings (the IOC holds them)."""

        def on_value(value) -> None:
            if isinstance(value, Exception):
                return
            try:
                setattr(self._settings, name, convert(value))
            except (TypeError, ValueError, KeyError) as exc:
                log.warning("policy setting %s: %s", name, exc)

        return on_value

    def _on_quality(self, value) -> None:
        if isinstance(value, Exception):
            return
        stamp = value["timeStamp.secondsPastEpoch"] + value["timeStamp.nanoseconds"] * 1e-9
        self._edge_quality.append((stamp, float(value["value"])))

    def _positions(self, path: str) -> tuple[str, object]:
        technique, positions, _ = self._scan_facts(path)
        return technique, positions

    def _scan_facts(self, path: str):
        """(technique, positions, the frames' time stamps) of a scan."""
        scan = read_scan(path)
        return scan["technique"], scan[POSITIONS[scan["technique"]][0]], scan["timestamps"]

    def _scan_quality(self, path: str, stamps, newest: bool) -> float | None:
        """The edge's figure for this scan, by the frames' time stamps; when none falls in
        the scan (e.g. the detector's clock is not the edge's), the latest for the newest
        scan, with a warning, and None for older ones."""
        history = list(self._edge_quality)
        if len(stamps):
            settle = 2 * self.cfg.edge.stats_publish_s
            quality = quality_during(history, float(stamps[0]), float(stamps[-1]), settle)
            if quality is not None:
                return quality
        if not newest:
            return None
        latest = next((v for _, v in reversed(history) if math.isfinite(v)), None)
        if latest is not None:
            log.warning(
                "policy: no edge:ScanConsistency posted during %s (clocks apart?): "
                "taking the latest, %.4g",
                path,
                latest,
            )
        return latest

    def _note_trained(self, technique: str, scans: list[str]) -> None:
        """The policy's training set is what this retraining staged."""
        positions = []
        for path in scans:
            try:
                positions.append(self._positions(path)[1])
            except (OSError, KeyError, ValueError) as exc:
                log.warning("policy: positions of %s unreadable: %s", path, exc)
        with self._policy_lock:
            self._known_scans.update(scans)
            self.policy.trained(technique, positions, time.monotonic())

    def _trained_at_start(self) -> None:
        """What the serving models were trained on is the policy's training set at start."""
        for kind in ("ptychonn", "braggnn"):
            version = self.registry.accepted(kind)
            if version is None:
                continue
            scans = [str(p) for p in self.registry.meta(version).get("trained_on") or []]
            positions = []
            for path in scans:
                try:
                    technique, pos = self._positions(path)
                    positions.append(pos)
                except (OSError, KeyError, ValueError):
                    continue  # moved or deleted since: its frames are not here to compare
            if positions:
                with self._policy_lock:
                    self._known_scans.update(scans)
                    self.policy.trained(technique, positions, now=None)

    def _policy_loop(self) -> None:
        """Every ``policy.poll_s``: new complete scans go to the policy with the edge's
        latest label-free quality (that of the scan just ended), and the policy decides."""
        while not self._stop.wait(self.cfg.policy.poll_s):
            try:
                self._policy_step()
            except Exception:  # the policy must never stop the service
                log.exception("retraining policy failed")

    def _policy_step(self) -> None:
        new = [
            (path, technique)
            for path, technique, _ in reversed(usable_scans(self.cfg.data_path))
            if path not in self._known_scans
        ]
        for path, technique in new:
            self._known_scans.add(path)
            try:
                _, positions, stamps = self._scan_facts(path)
            except (OSError, KeyError, ValueError) as exc:
                log.warning("policy: skipping scan %s: %s", path, exc)
                continue
            quality = self._scan_quality(path, stamps, newest=path == new[-1][0])
            with self._policy_lock:
                scan = self.policy.observe(path, technique, positions, quality)
            log.info(
                "policy: new %s scan %s, %d frames (%d unlike the training set), "
                "edge:ScanConsistency %s",
                technique,
                path,
                len(scan.positions),
                scan.unlike,
                _fmt(quality),
            )
        if self._busy.locked():
            return
        with self._policy_lock:
            reason = self.policy.decide(self._settings, time.monotonic())
        if reason:
            self.request(reason)

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> RetrainService:
        self._put("ml:Endpoint", self.endpoint)
        self._put("ml:ModelVersion", self.registry.accepted(MODE_KIND[self.cfg.mode]) or 0)
        self._status("Idle", f"retraining service ready (executor {self.endpoint})")
        for name, callback in (
            ("ml:Retrain", self._button("ml:Retrain", lambda: self.request(OPERATOR))),
            ("ml:Request", self._on_request),
            ("ml:AutoRetrain", self._setting("enabled", lambda v: bool(v["value.index"]))),
            ("ml:AutoThreshold", self._setting("threshold", lambda v: float(v["value"]))),
            ("ml:AutoThresholdPx", self._setting("threshold_px", lambda v: float(v["value"]))),
            ("ml:AutoMinInterval", self._setting("min_interval_s", lambda v: float(v["value"]))),
            ("ml:AutoMinFrames", self._setting("min_new_frames", lambda v: int(v["value"]))),
            ("edge:ScanConsistency", self._on_quality),
            ("ml:Abort", self._button("ml:Abort", self.abort)),
            ("ml:Rollback", self._button("ml:Rollback", self.rollback)),
            ("ml:Endpoint", self._on_endpoint),
        ):
            # disconnects too: ml:Endpoint's tell the IOC restarted (buttons ignore them)
            self._subs.append(
                self.ctx.monitor(f"{self.p}{name}", callback, notify_disconnect=True)
            )
        self._trained_at_start()
        threading.Thread(target=self._policy_loop, name="policy", daemon=True).start()
        self.reference = None
        if self.cfg.remote.reference:
            self.reference = ReferenceMonitor(self.cfg, self.ctx, self.registry, self._put)
            self.reference.start()
        # last: a beating service has made all of the above (what starters wait for)
        self._heartbeat = Heartbeat(self.ctx, f"{self.p}ml:Heartbeat").start()
        return self

    def stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if self.reference is not None:
            self.reference.stop()
        self._stop.set()
        self._abort.set()
        for sub in self._subs:
            sub.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
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
