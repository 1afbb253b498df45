"""The model records pushed to an MLflow model registry (``records.mlflow_uri``; the client
is ``mlflow-skinny``: ``pip install 'edgeloop[mlflow]'``), for users who find models there.

Each kind is one registered model (``edgeloop-ptychonn``, ``edgeloop-braggnn``); each record
(edgeloop/model_records.py) one model version, logged from an MLflow run of experiment
``edgeloop`` that holds the record's files as artifacts (``record/``), its figures as metrics
and its provenance as parameters. The version's tag ``edgeloop.status`` follows the file
registry (accepted, rejected), and the alias ``serving`` names the version the edge serves:
aliases are MLflow's replacement of the stages it deprecated in 2.9. The file registry stays
the record; :func:`sync` makes MLflow agree with it and may be run again at any time (a
server that was down is caught up with on the next one).
"""

from __future__ import annotations

import json
import logging
import os

from edgeloop import model_records as records
from edgeloop.config import Config
from edgeloop.optional import require
from edgeloop.registry import ModelFileError, Registry

log = logging.getLogger(__name__)

EXPERIMENT = "edgeloop"
SERVING = "serving"
VERSION_TAG, STATUS_TAG = "edgeloop.version", "edgeloop.status"
# a server that does not answer costs a few seconds, not MLflow's minutes of retries
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def model_name(kind: str) -> str:
    return f"edgeloop-{kind}"


def client(uri: str):
    require("mlflow", "mlflow")
    for key, value in CLIENT_ENV.items():
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def close_artifact_repos() -> None:
    """MLflow keeps each run's artifact repository, and its thread pool, for the life of
    the process: the service, which runs for days, lets them go after each sync."""
    from mlflow.tracking._tracking_service import utils

    cache = getattr(utils, "_artifact_repos_cache", None)
    while cache:
        _, repo = cache.popitem()
        pool = getattr(repo, "thread_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)


def _experiment(c) -> str:
    found = c.get_experiment_by_name(EXPERIMENT)
    return found.experiment_id if found else c.create_experiment(EXPERIMENT)


def _flat(prefix: str, value) -> dict[str, str]:
    """A nested dict as MLflow parameters (strings of at most 6000 characters)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flat(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: json.dumps(value)[:6000] if not isinstance(value, str) else value[:6000]}


def push(c, folder, card: dict, status: str) -> str:
    """Log the record in ``folder`` as a run and register it; the MLflow version number."""
    from mlflow.entities import Metric, Param, RunTag

    name, version = model_name(card["kind"]), card["version"]
    if not c.search_registered_models(f"name = '{name}'"):
        c.create_registered_model(name, description=card["intended_use"])
    run = c.create_run(_experiment(c), run_name=f"{card['kind']}-v{version:04d}")
    params = _flat("", {
        "arch": card["architecture"]["arch"],
        "parent_version": card["parent_version"],
        "code_version": card["code_version"],
        "labels": card["training_data"]["labels"],
        "training": card["training"]["settings"] or {},
    })  # fmt: skip
    metrics = {k: v for k, v in card["metrics"].items() if isinstance(v, int | float)}
    tags = {VERSION_TAG: str(version), "edgeloop.weights_sha256": card["weights_sha256"],
            "edgeloop.runs": json.dumps([r.get("uid") or r["ref"] for r in
                                         card["training_data"]["runs"]])[:5000]}  # fmt: skip
    c.log_batch(
        run.info.run_id,
        metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    c.log_artifacts(run.info.run_id, str(folder), artifact_path="record")
    c.set_terminated(run.info.run_id)
    mv = c.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/record",
        run_id=run.info.run_id,
        tags={VERSION_TAG: str(version), STATUS_TAG: status},
        description=(folder / "README.md").read_text()[:5000],
    )
    log.info("model v%d registered in MLflow as %s version %s", version, name, mv.version)
    return str(mv.version)


def sync(cfg: Config) -> dict[str, dict[int, str]]:
    """Register every record MLflow lacks, set each version's status tag to the file
    registry's, and point the alias ``serving`` at the version each kind serves. Returns
    {kind: {edgeloop version: MLflow version}}."""
    c = client(cfg.records.mlflow_uri)
    try:
        return _sync(c, cfg)
    finally:
        close_artifact_repos()


def _sync(c, cfg: Config) -> dict[str, dict[int, str]]:
    registry = Registry(cfg.registry_path)
    out: dict[str, dict[int, str]] = {}
    for folder in sorted(records.records_dir(cfg.registry_path).glob("*-v*")):
        if not (folder / records.SUMS).exists():
            continue
        card = json.loads((folder / "card.json").read_text())
        kind, version = card["kind"], card["version"]
        try:
            status = registry.meta(version).get("status") or "candidate"
        except ModelFileError:
            status = "unknown"
        name = model_name(kind)
        known = {
            int(mv.tags[VERSION_TAG]): mv
            for mv in c.search_model_versions(f"name = '{name}'")
            if VERSION_TAG in mv.tags
        }
        if version in known:
            mv_version = str(known[version].version)
            if known[version].tags.get(STATUS_TAG) != status:
                c.set_model_version_tag(name, mv_version, STATUS_TAG, status)
        else:
            mv_version = push(c, folder, card, status)
        out.setdefault(kind, {})[version] = mv_version
    for kind, versions in out.items():
        try:
            serving = registry.accepted(kind)
        except Exception as exc:  # an unreadable record of acceptance: leave the alias
            log.error("MLflow alias %s of %s left as it was: %s", SERVING, kind, exc)
            continue
        if serving in versions:
            c.set_registered_model_alias(model_name(kind), SERVING, versions[serving])
        else:
            try:
                c.delete_registered_model_alias(model_name(kind), SERVING)
            except Exception:  # none set
                pass
    return out
