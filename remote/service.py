"""The retraining service: watches $(P)ml:Retrain, runs stage -> analyze -> train ->
validate -> deploy on the configured executor, and reports every step in $(P)ml:*.

The technique of the newest scan decides what is retrained: PtychoNN on phase-retrieval
labels for ptychography, BraggNN on pseudo-Voigt-fit labels for HEDM."""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout

from p4p.client.thread import Context

from edgeloop.config import MODE_KIND, MODE_TECHNIQUE, Config
from edgeloop.registry import Registry, sha256_bytes
from edgeloop.remote import tasks
from edgeloop.remote.executors import make_executor
from edgeloop.scanfile import list_scans, scan_summary

log = logging.getLogger(__name__)

STATES = ["Idle", "Staging", "Analyzing", "Training", "Validating", "Deploying", "Error"]
# coarse $(P)ml:Progress (%) at the start of each state; Error keeps the last value
PROGRESS = {"Idle": 100.0, "Staging": 0.0, "Analyzing": 5.0, "Training": 35.0,
            "Validating": 90.0, "Deploying": 95.0}


class RetrainError(RuntimeError):
    pass


def _summaries(data_dir):
    """(path, technique, frames) of the readable scans, newest first."""
    for path in reversed(list_scans(data_dir)):
        try:
            technique, n = scan_summary(path)
        except (OSError, KeyError) as exc:
            log.warning("skipping unreadable scan %s: %s", path, exc)
            continue
        yield path, technique, n


def newest_technique(data_dir) -> str | None:
    """The technique of the newest usable scan: what the beamline is doing now."""
    return next((t for _, t, n in _summaries(data_dir) if n >= 4), None)


def stage_scans(data_dir, max_frames: int, technique: str = "ptychography") -> list[str]:
    """Newest scans of a technique whose frames add up to at most max_frames (at least one
    scan)."""
    chosen, total = [], 0
    for path, kind, n in _summaries(data_dir):
        if n < 4 or kind != technique:
            continue
        if chosen and total + n > max_frames:
            break
        chosen.append(str(path))
        total += n
    return list(reversed(chosen))


class RetrainService:
    def __init__(self, cfg: Config, executor=None, step_timeout: float = 1800.0):
        self.cfg = cfg
        self.p = cfg.prefix
        self.registry = Registry(cfg.registry_path)
        self.executor = executor or make_executor(cfg.executor)
        self.step_timeout = step_timeout
        self.ctx = Context("pva", nt=False)
        self._busy = threading.Lock()
        self._pending = False
        self._stop = threading.Event()
        self._sub = None
        self.last_result: dict | None = None

    # ---- PV helpers ----------------------------------------------------------------------
    def _put(self, name: str, value) -> None:
        try:
            self.ctx.put(f"{self.p}{name}", value, timeout=5)
        except Exception as exc:
            log.error("cannot write %s%s: %s", self.p, name, exc)

    def _status(self, state: str, message: str | None = None) -> None:
        self._put("ml:Status", {"value.index": STATES.index(state)})
        if state in PROGRESS:
            self._put("ml:Progress", PROGRESS[state])
        if message is not None:
            log.log(logging.ERROR if state == "Error" else logging.INFO, "%s: %s", state, message)
            self._put("ml:Message", message[:500])

    # ---- trigger -------------------------------------------------------------------------
    def _on_retrain(self, value) -> None:
        if isinstance(value, Exception):
            return
        if int(value["value.index"]) != 1:
            return
        threading.Thread(target=self._put, args=("ml:Retrain", {"value.index": 0}),
                         daemon=True).start()
        self.request()

    def request(self) -> bool:
        """Start retraining now, or queue one follow-up if a retraining is running."""
        if not self._busy.acquire(blocking=False):
            self._pending = True
            self._put("ml:Message", "retraining already running; one follow-up queued")
            return False
        threading.Thread(target=self._run_locked, name="retrain", daemon=True).start()
        return True

    def _run_locked(self) -> None:
        try:
            while True:
                self._pending = False
                self.run_once()
                if not self._pending or self._stop.is_set():
                    break
        finally:
            self._busy.release()

    # ---- the pipeline --------------------------------------------------------------------
    def _wait(self, future, what: str):
        try:
            return future.result(timeout=self.step_timeout)
        except FutureTimeout:
            future.cancel()
            raise RetrainError(f"{what} exceeded {self.step_timeout:.0f} s") from None
        except Exception as exc:
            raise RetrainError(f"{what} failed: {type(exc).__name__}: {exc}") from exc

    def _analysis_request(self, kind: str, scans: list[str]) -> tuple[str, dict]:
        """(what the analysis is, in words; its request)."""
        cfg = self.cfg
        out = cfg.registry_path / "work" / f"labels_{kind}_{int(time.time())}.h5"
        request = {"scans": scans, "kind": kind, "out": str(out)}
        if kind == "braggnn":
            request.update(patch=cfg.model.patch, sigma=cfg.edge.peak_sigma,
                           min_separation=cfg.edge.peak_min_separation)
            return "pseudo-Voigt peak fits", request
        request.update(pixel_um=cfg.sim.pixel_um,
                       probe={"radius_px": cfg.sim.probe_radius_px,
                              "defocus": cfg.sim.probe_defocus},
                       epochs=cfg.train.recon_epochs, algorithm=cfg.train.recon_algorithm,
                       threads=cfg.train.threads, input_size=cfg.model.input_size)
        return f"phase retrieval ({cfg.train.recon_algorithm})", request

    def run_once(self) -> dict | None:
        cfg = self.cfg
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        try:
            self._status("Staging", f"staging scans from {cfg.data_path}")
            t0 = time.perf_counter()
            technique = newest_technique(cfg.data_path)
            if technique is None:
                raise RetrainError(f"no scans to train on in {cfg.data_path}")
            mode = {t: m for m, t in MODE_TECHNIQUE.items()}[technique]
            kind = MODE_KIND[mode]
            train_cfg = cfg.training(kind)
            scans = stage_scans(cfg.data_path, train_cfg.max_frames, technique)
            timings["staging_s"] = time.perf_counter() - t0

            what, request = self._analysis_request(kind, scans)
            self._status("Analyzing", f"{what} on {len(scans)} {technique} scan(s)")
            labels = self._wait(self.executor.submit(tasks.analyze, request), what)
            timings["analysis_s"] = labels["seconds"]

            best = self.registry.best(kind)
            init, init_sha = None, None
            if best is not None:
                meta = self.registry.meta(best)
                init, init_sha = str(self.registry.root / meta["file"]), meta["sha256"]
            self._status("Training", f"training {kind} on {labels['n_frames']} samples from "
                                     f"{'v%d' % best if best else 'scratch'}")
            result = self._wait(self.executor.submit(tasks.train_model, {
                "labels": labels["labels"], "labels_sha256": labels["sha256"],
                "init": init, "init_sha256": init_sha, "kind": kind,
                "arch": cfg.arch(kind), "train": vars(train_cfg),
            }), "training")
            timings["training_s"] = result["seconds"]

            self._status("Validating", "checking the returned model")
            if sha256_bytes(result["model"]) != result["sha256"]:
                raise RetrainError("returned model fails its checksum")
            if not math.isfinite(result["val_loss"]):
                raise RetrainError(f"validation loss is {result['val_loss']}")
            version = self.registry.add(result["model"], {
                "kind": kind, "arch": result["arch"], "val_loss": result["val_loss"],
                "trained_on": scans, "n_frames": result["n_frames"], "parent": best,
                "history": result["history"], "timings": timings,
            })
            self._put("ml:ValLoss", result["val_loss"])

            self._status("Deploying", f"deploying model v{version}")
            t0 = time.perf_counter()
            try:
                self.ctx.put(f"{self.p}edge:LoadModel", version, timeout=120, wait=True)
            except Exception as exc:
                raise RetrainError(f"edge refused model v{version}: {exc}") from exc
            timings["deploy_s"] = time.perf_counter() - t0
            timings["end_to_end_s"] = time.perf_counter() - t_start
            self._put("ml:ModelVersion", version)
            self._status("Idle", f"{kind} model v{version} serving; val loss "
                                 f"{result['val_loss']:.4g}; "
                                 + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
            self.last_result = {"version": version, "kind": kind,
                                "val_loss": result["val_loss"], "timings": timings}
            return self.last_result
        except RetrainError as exc:
            self._status("Error", str(exc))
        except Exception as exc:  # a bug must still end in Error, never a dead service
            log.exception("retraining failed")
            self._status("Error", f"retraining failed: {type(exc).__name__}: {exc}")
        return None

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> "RetrainService":
        self._put("ml:Endpoint", self.cfg.executor)
        self._put("ml:ModelVersion", self.registry.accepted(MODE_KIND[self.cfg.mode]) or 0)
        self._status("Idle", f"retraining service ready (executor {self.cfg.executor})")
        self._sub = self.ctx.monitor(f"{self.p}ml:Retrain", self._on_retrain)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._sub is not None:
            self._sub.close()
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
