"""One retraining, free of EPICS: ``RetrainPipeline.run`` stages the scans, has the
executor analyse them (labels) and train, has its ``ModelGate`` (remote/gate.py) validate
the returned model and gate it against the serving one, and deploys it, telling a
``Progress`` each step.

Also here: ``stage_scans`` (which of the usable scans, remote/scan_index.py, a retraining
takes) and ``analysis_request`` (what labelling a scan asks of an executor).  The technique
of the newest scan decides what is retrained: PtychoNN on phase-retrieval labels for
ptychography, BraggNN on pseudo-Voigt-fit labels for HEDM."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Protocol

from edgeloop import model_records, scanfile
from edgeloop.config import MODE_KIND, MODE_TECHNIQUE, Config
from edgeloop.registry import NOT_NOW, Registry
from edgeloop.remote import tasks
from edgeloop.remote.errors import Aborted, RetrainError
from edgeloop.remote.executor_slot import ExecutorSlot
from edgeloop.remote.gate import ModelGate, Trained
from edgeloop.remote.scan_index import scan_index
from edgeloop.remote.staging import code_version, staging

log = logging.getLogger(__name__)

TECHNIQUE_MODE = {t: m for m, t in MODE_TECHNIQUE.items()}
DEPLOY_RETRY_S = (10.0, 30.0, 90.0)  # waits before loading a version the edge could not load now


def stage_scans(scans: list[tuple[str, str, int]], technique: str, max_frames: int) -> list[str]:
    """Of ``ScanIndex.usable``, the newest of a technique whose frames add up to at most
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


def labels_method(what: str, request: dict) -> dict:
    """How the labels were made, for the model card: the method in words and its settings
    (the analysis request without its files)."""
    settings = {k: v for k, v in request.items() if k not in ("scans", "out", "cache_dir")}
    return {"method": what, "settings": settings}


def analysis_request(cfg: Config, kind: str, scans: list[str]) -> tuple[str, dict]:
    """(what the analysis is, in words; its request): what the service asks of its
    executor, and what a demo asks to label a scan the same way."""
    where = staging(cfg)
    out = where.labels_out(f"labels_{kind}_{int(time.time())}.h5")
    request = {"scans": scans, "kind": kind, "out": out}
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
        # labels of scans seen before are reused where the filesystem is shared
        cache_dir=str(cfg.registry_path / "work" / "labels_cache") if where.cache_labels else None,
    )
    return f"phase retrieval ({cfg.train.recon_algorithm})", request


class Progress(Protocol):
    """Where a retraining reports: each step as it starts, and figures as they are known
    (``trigger``, ``val_loss``, ``model_version``)."""

    def enter(self, state: str, message: str) -> None: ...

    def record(self, name: str, value) -> None: ...


class RetrainPipeline:
    """Stage -> analyse -> train -> validate -> gate -> deploy on ``slot``'s executor.

    ``deploy(version)`` makes the edge serve a registry version (raises if it refuses);
    ``on_staged(technique, scans)`` hears what a retraining trains on (the policy's
    training set); ``abort``, once set, ends the run between or during steps."""

    def __init__(
        self,
        cfg: Config,
        registry: Registry,
        slot: ExecutorSlot,
        progress: Progress,
        deploy: Callable[[int], None],
        on_staged: Callable[[str, list[str]], None] = lambda technique, scans: None,
        step_timeout: float | None = None,
    ):
        self.cfg, self.registry, self.slot = cfg, registry, slot
        self.gate = ModelGate(cfg, registry)
        self.progress, self.deploy, self.on_staged = progress, deploy, on_staged
        self.abort = threading.Event()
        self.scans = scan_index(cfg)
        self.where = None  # how the executor gets the files (remote/staging.py), per run
        self.runs: list[dict] = []  # what the run trains on: ref, uid, frames
        self.step = "Idle"
        self._step_timeout = step_timeout

    @property
    def step_timeout(self) -> float:
        return self._step_timeout or self.cfg.remote.task_timeout_s

    def run(self, trigger: str) -> dict:
        """One retraining; its summary, or RetrainError (Aborted) saying why not."""
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        key = self.gate.signing_key()  # a missing key fails now, not after the training
        self.where = staging(self.cfg, getattr(self.slot.executor, "runs_whole_retraining", False))
        self.gate.gate_key()
        self.slot.ready()
        technique, kind, train_cfg, scans = self._stage(trigger, timings)
        if getattr(self.slot.executor, "runs_whole_retraining", False):
            labels, trained = self._flow(technique, kind, scans, train_cfg, timings)
        elif train_cfg.loss == "physics":
            labels, trained = self._physics_first(kind, scans, train_cfg, timings)
        else:
            labels = self._analyse(technique, kind, scans, timings)
            trained = self._train(kind, labels, train_cfg)
        result, serving = trained.result, trained.serving
        timings["training_s"] = result["seconds"]
        self._enter("Validating", "checking the returned model")
        # from here on the labels are the ones the service reads (brought back if need be)
        labels = dict(labels, labels=self.where.labels_here(labels["labels"]))
        figures = self.gate.validate(trained, kind, key, labels, train_cfg)
        self._check_abort()
        meta = self._meta(trigger, kind, scans, train_cfg, trained, labels, figures, timings)
        version = self.registry.add(result["model"], meta)
        self.progress.record("val_loss", figures["val_loss"])
        self.gate.quality_gate(version, figures)
        self.gate.approve(version, trained, labels)
        self._deploy(version, serving)
        record_problem = self.record(version)
        # return: from the end of training (remote) to serving here; the task's own clock
        # does not see queueing and result transfer, so that is included
        trained_for = trained.returned - trained.submitted
        timings["return_s"] = (
            time.perf_counter() - trained.returned + max(0.0, trained_for - result["seconds"])
        )
        timings["end_to_end_s"] = time.perf_counter() - t_start
        return {
            "version": version,
            "kind": kind,
            "val_loss": figures["val_loss"],
            "timings": timings,
            "trigger": trigger,
            "record_problem": record_problem,
        }

    def _meta(self, trigger, kind, scans, train_cfg, trained, labels, figures, timings) -> dict:
        """The registry's metadata of the returned model (the timings so far)."""
        result = trained.result
        return {
            "kind": kind,
            "arch": result["arch"],
            **figures,
            "baseline": trained.serving,
            "skipped_frames": labels.get("skipped_frames", 0),
            "signature": result.get("signature"),
            "trained_on": scans,
            "runs": self.runs,
            "labels_sha256": labels["sha256"],
            "labels_method": labels["method"],
            "train_settings": vars(train_cfg),
            "n_frames": result["n_frames"],
            "parent": trained.best,
            "history": result["history"],
            "timings": timings,
            "executor": self.slot.name,
            "trigger": trigger,
            "code_version": code_version(),
        }

    # ---- the steps -----------------------------------------------------------------------
    def _check_abort(self) -> None:
        if self.abort.is_set():
            step = "retraining" if self.step in ("Idle", "Error") else self.step.lower()
            raise Aborted(f"{step} aborted by ml:Abort")

    def _enter(self, state: str, message: str) -> None:
        """The next step, unless an abort came during the last one."""
        self._check_abort()
        self.step = state
        self.progress.enter(state, message)

    def _result(self, fn, request: dict, what: str):
        future = self.slot.submit(fn, request)
        return self.slot.result(future, what, self.step_timeout, self.abort)

    def _stage(self, trigger: str, timings: dict) -> tuple[str, str, object, list[str]]:
        cfg = self.cfg
        self._enter("Staging", f"staging scans from {self.scans.where}; trigger: {trigger}")
        t0 = time.perf_counter()
        available = self.scans.usable(cfg.data_path)
        if not available:
            raise RetrainError(f"no scans to train on in {self.scans.where}")
        technique = available[0][1]
        kind = MODE_KIND[TECHNIQUE_MODE[technique]]
        train_cfg = cfg.training(kind)
        scans = stage_scans(available, technique, train_cfg.max_frames)
        frames = {path: n for path, _, n in available}
        self.runs = [{"ref": s, "uid": scanfile.run_uid(s), "frames": frames[s]} for s in scans]
        self.on_staged(technique, scans)
        self.progress.record("trigger", trigger)
        log.info("retraining %s on %d scan(s) (%s)", kind, len(scans), trigger)
        scans = self.where.scans(scans)
        timings["staging_s"] = time.perf_counter() - t0
        return technique, kind, train_cfg, scans

    def _analyse(self, technique: str, kind: str, scans: list[str], timings: dict) -> dict:
        what, request = analysis_request(self.cfg, kind, scans)
        self._enter("Analyzing", f"{what} on {len(scans)} {technique} scan(s)")
        labels = self._result(tasks.analyze, request, what)
        timings["analysis_s"] = labels["seconds"]
        return dict(labels, method=labels_method(what, request))

    def _flow(self, technique: str, kind: str, scans: list[str], train_cfg, timings: dict):
        """Analysis and training as one run of the executor's flow (remote/flows.py)."""
        what, analysis = analysis_request(self.cfg, kind, scans)
        self._enter("Analyzing", f"{what} and training in one Globus flow run")
        best, _ = self.gate.usable_best(kind)
        request, serving, baseline = self._train_request(kind, None, train_cfg, best)
        submitted = time.perf_counter()
        labels, result = self.slot.executor.retrain(
            analysis, request, self.where, self.progress, self.abort, 2 * self.step_timeout
        )
        timings["analysis_s"] = labels["seconds"]
        labels = dict(labels, method=labels_method(what, analysis))
        request = dict(request, labels=labels["labels"], labels_sha256=labels["sha256"])
        trained = Trained(best, serving, baseline, request, result, submitted, time.perf_counter())
        return labels, trained

    def _physics_first(self, kind: str, scans: list[str], train_cfg, timings: dict):
        """Physics-informed training needs no labels: it is submitted on the scans' frames
        first, and the labels that the gate, the reference and the model card need are
        made beside it (after it, on a one-worker executor); both cover the same frames in
        the same order, so the gate's held-out split is the one training kept out."""
        what, analysis = analysis_request(self.cfg, kind, scans)
        best, skipped = self.gate.usable_best(kind)
        self._enter(
            "Training",
            f"training {kind} with the physics loss on the frames of {len(scans)} scan(s) "
            f"{self._start(best, skipped)}; {what} beside it for the gate",
        )
        out = self.where.labels_out(f"frames_{kind}_{int(time.time())}.h5")
        frames = self._result(tasks.prepare_frames, dict(analysis, out=out), "reading frames")
        training_set = {"labels": frames["frames"], "sha256": frames["sha256"]}
        request, serving, baseline = self._train_request(kind, training_set, train_cfg, best)
        submitted = time.perf_counter()
        training = self.slot.submit(tasks.train_model, request)
        labelling = self.slot.submit(tasks.analyze, analysis)
        try:
            result = self.slot.result(training, "training", self.step_timeout, self.abort)
        except BaseException:
            self.slot.cancel(labelling)  # no labels for a model that never came
            raise
        returned = time.perf_counter()
        labels = self.slot.result(labelling, what, self.step_timeout, self.abort)
        if labels["n_frames"] != frames["n_frames"]:
            raise RetrainError(
                f"{what} labelled {labels['n_frames']} frames, training read "
                f"{frames['n_frames']}: the gate's held-out split would not be training's"
            )
        timings["analysis_s"] = labels["seconds"]
        labels = dict(labels, method=labels_method(what, analysis))
        return labels, Trained(best, serving, baseline, request, result, submitted, returned)

    def _start(self, best: int | None, skipped: list[str]) -> str:
        """Where a training starts, for ml:Message: "from v3 (unusable, skipped: v5) (local)"."""
        return (
            f"from {f'v{best}' if best else 'scratch'} "
            + (f"(unusable, skipped: {', '.join(skipped)}) " if skipped else "")
            + f"({self.slot.name})"
        )

    def _train(self, kind: str, labels: dict, train_cfg) -> Trained:
        best, skipped = self.gate.usable_best(kind)
        self._enter(
            "Training",
            f"training {kind} on {labels['n_frames']} samples {self._start(best, skipped)}",
        )
        request, serving, baseline = self._train_request(kind, labels, train_cfg, best)
        submitted = time.perf_counter()
        result = self._result(tasks.train_model, request, "training")
        return Trained(best, serving, baseline, request, result, submitted, time.perf_counter())

    def _train_request(self, kind: str, labels: dict | None, train_cfg, best: int | None):
        """(the training's request from version ``best``, the serving version and its
        model); without ``labels``, a flow's Train state adds Analyze's."""
        cfg = self.cfg
        serving, baseline = self.gate.serving(kind)
        models = {**self.gate.ref("init", best), **self.gate.ref("baseline", serving)}
        sent = [name for name in ("init", "baseline") if models[name]]
        models.update(zip(sent, self.where.models([models[name] for name in sent]), strict=True))
        request = {
            "request_id": secrets.token_hex(16),  # signed back with the result: no replay
            "labels": labels and labels["labels"],
            "labels_sha256": labels and labels["sha256"],
            **models,
            "kind": kind,
            "arch": cfg.arch(kind),
            "train": vars(train_cfg),
            # the path, never the key: the executor's machine reads its own copy
            "signing_key_file": cfg.security.executor_signing_key_file
            or cfg.security.signing_key_file,
            "security": {
                k: getattr(cfg.security, k) for k in ("max_model_bytes", "max_width", "max_patch")
            },
        }
        return request, serving, baseline

    def _deploy(self, version: int, serving: int | None) -> None:
        """The edge loads the version; one it cannot load now (out of memory, an I/O error:
        it says "not loaded now" and rejects nothing) is tried again after each of
        DEPLOY_RETRY_S, an abort ending the wait."""
        self._enter("Deploying", f"deploying model v{version}")
        for wait in (*DEPLOY_RETRY_S, None):
            try:
                self.deploy(version)
                break
            except Exception as exc:
                if wait is None or NOT_NOW not in str(exc):
                    raise RetrainError(f"edge refused model v{version}: {exc}") from exc
                log.warning("deploying v%d: %s; again in %.0f s", version, exc, wait)
                self.progress.enter(
                    "Deploying", f"edge could not load v{version} now; again in {wait:.0f} s"
                )
                if self.abort.wait(wait):
                    raise Aborted(f"deploying v{version} aborted by ml:Abort") from exc
        if self.abort.is_set():  # came while the edge was loading it
            raise Aborted(f"deploying aborted by ml:Abort: {self.withdraw(version, serving)}")

    def record(self, version: int) -> str | None:
        """The model record of a version the edge accepted (edgeloop/model_records.py);
        one that cannot be written leaves the version serving: why, for ml:Message."""
        if not self.cfg.records.enabled:
            return None
        try:
            folder = model_records.write_record(self.cfg, version, self.registry)
        except (model_records.RecordError, ImportError, OSError, ValueError, RuntimeError) as exc:
            # ImportError: the ONNX export needs edgeloop[onnx]
            log.error("model v%d serves, but its record was not written: %s", version, exc)
            return f"no model record: {exc}"
        log.info("model v%d: record in %s", version, folder)
        return None

    def withdraw(self, version: int, serving: int | None) -> str:
        """Take a model the edge loaded before an abort out of service again: the one
        serving before goes back, the new one is marked rejected (never served again)."""
        if serving is None:
            self.progress.record("model_version", version)
            return f"v{version} was loaded already and stays: no earlier model to go back to"
        try:
            self.deploy(serving)
        except Exception as exc:
            self.progress.record("model_version", version)
            return f"v{version} was loaded already and stays: v{serving} failed to load: {exc}"
        self.registry.mark_rejected(version, "withdrawn: ml:Abort came while it was deploying")
        self.progress.record("model_version", serving)
        return f"v{version} withdrawn, v{serving} serving again"
