"""The retraining's remote steps as one Globus Flow (``remote.executor = "globus-flows"``), as
the APS ptychography pipeline runs them (Bicer et al. 2021; Babu et al. 2023): the facility's
flow service, not the beamline host, carries a retraining through network trouble and
restarts.

The flow is built from the same task functions the other executors run
(``remote/tasks.py``): **Analyze** calls :func:`tasks.analyze` on the Globus Compute endpoint,
**Train** calls :func:`tasks.train_on_labels` with Analyze's output; with
``remote.staging = "globus"`` a **TransferIn** state first sends the scans and the models the
training starts from (Globus Transfer), and a **TransferBack** state last brings the labels
home for the service's own held-out check. It is deployed once (``edgeloop flows deploy``:
the functions registered with Globus Compute, the flow created with ``FlowsClient``; its id
kept in ``<registry_dir>/flow.json``) and run once per retraining with the scans, the
settings and the checksums as input. The service follows the run into ``ml:Status`` and
``ml:Message``; ``ml:Abort`` cancels the run; the returned model goes through the same
validation, gate and signature as any executor's.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from pathlib import Path

from edgeloop.config import Config
from edgeloop.optional import require
from edgeloop.registry import atomic_write
from edgeloop.remote import tasks
from edgeloop.remote.errors import Aborted, RetrainError

log = logging.getLogger(__name__)

COMPUTE_URL = "https://compute.actions.globus.org"
TRANSFER_URL = "https://actions.globus.org/transfer/transfer"
# the task function each Compute state calls, by the input field holding its id
FUNCTIONS = {"analyze_function_id": tasks.analyze, "train_function_id": tasks.train_on_labels}
# what ml:Status says while a state runs
STEPS = {
    "TransferIn": "Staging",
    "Analyze": "Analyzing",
    "Train": "Training",
    "TransferBack": "Validating",
}
FLOW_FILE = "flow.json"
WAIT_S = 24 * 3600  # how long a state may wait for its action (the service has its own limit)

_ITEMS = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["source_path", "destination_path"],
        "properties": {"source_path": {"type": "string"}, "destination_path": {"type": "string"}},
    },
}
INPUT_SCHEMA = {
    "type": "object",
    "required": [
        "compute_endpoint",
        "analyze_function_id",
        "train_function_id",
        "analysis",
        "train",
    ],
    "properties": {
        "compute_endpoint": {"type": "string", "description": "Globus Compute endpoint UUID"},
        "analyze_function_id": {"type": "string"},
        "train_function_id": {"type": "string"},
        "analysis": {
            "type": "object",
            "description": "tasks.analyze's request: scans, kind, labels file, label settings",
            "required": ["scans", "kind", "out"],
        },
        "train": {
            "type": "object",
            "description": "tasks.train_model's request but the "
            "labels: request id, models and checksums, settings",
            "required": ["request_id", "kind", "arch", "train", "signing_key_file"],
        },
        "source_collection": {"type": "string"},
        "dest_collection": {"type": "string"},
        "transfer_in": _ITEMS,
        "transfer_back": _ITEMS,
    },
    "additionalProperties": False,
}


def _compute(function_field: str, kwargs: dict, nxt: str | None) -> dict:
    state = {
        "Type": "Action",
        "ActionUrl": COMPUTE_URL,
        "Parameters": {
            "tasks": [
                {
                    "endpoint.$": "$.compute_endpoint",
                    "function.$": f"$.{function_field}",
                    "kwargs": kwargs,
                }
            ]
        },
        "ResultPath": None,  # set below
        "WaitTime": WAIT_S,
        "ExceptionOnActionFailure": True,
    }
    return _chain(state, nxt)


def _transfer(items: str, back: bool, nxt: str | None) -> dict:
    ends = (
        ("$.dest_collection", "$.source_collection")
        if back
        else ("$.source_collection", "$.dest_collection")
    )
    state = {
        "Type": "Action",
        "ActionUrl": TRANSFER_URL,
        "Parameters": {
            "source_endpoint.$": ends[0],
            "destination_endpoint.$": ends[1],
            "transfer_items.$": items,
            "sync_level": "checksum",
            "verify_checksum": True,
            "label": "edgeloop retraining",
        },
        "WaitTime": WAIT_S,
        "ExceptionOnActionFailure": True,
    }
    return _chain(state, nxt)


def _chain(state: dict, nxt: str | None) -> dict:
    return dict(state, Next=nxt) if nxt else dict(state, End=True)


def flow_definition(transfer: bool) -> dict:
    """The flow: [TransferIn] -> Analyze -> Train -> [TransferBack]; each state's result
    at ``$.<state>``."""
    names = ["TransferIn"] * transfer + ["Analyze", "Train"] + ["TransferBack"] * transfer
    after = dict(zip(names, [*names[1:], None], strict=True))
    states = {
        "Analyze": _compute("analyze_function_id", {"request.$": "$.analysis"}, after["Analyze"]),
        "Train": _compute(
            "train_function_id",
            {"request.$": "$.train", "labels.$": "$.Analyze.details.results[0].output"},
            after["Train"],
        ),
    }
    if transfer:
        states["TransferIn"] = _transfer("$.transfer_in", False, after["TransferIn"])
        states["TransferBack"] = _transfer("$.transfer_back", True, None)
    for name, state in states.items():
        state["ResultPath"] = f"$.{name}"
    return {
        "Comment": "edgeloop: the retraining's remote steps",
        "StartAt": names[0],
        "States": {n: states[n] for n in names},
    }


def _refs(value) -> list[str]:
    """Every JSONPath a state reads (``"x.$": "$.path"``), recursively."""
    if isinstance(value, dict):
        out = [v for k, v in value.items() if k.endswith(".$") and isinstance(v, str)]
        for v in value.values():
            out += _refs(v)
        return out
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    return []


def check_definition(definition: dict, schema: dict = INPUT_SCHEMA) -> list[str]:
    """What is wrong with a definition, offline (the service's own check,
    ``FlowsClient.validate_flow``, needs a login): the start and every Next name a state,
    one state ends, every state is reached, each reads only the input the schema declares
    or the result of a state before it, and actions only at the known providers."""
    problems: list[str] = []
    states = definition.get("States", {})
    start = definition.get("StartAt")
    if start not in states:
        return [f"StartAt {start!r} is not a state"]
    order, name = [], start
    while name is not None:
        if name in order:
            return problems + [f"state {name} is reached twice (a loop)"]
        if name not in states:
            return problems + [f"Next {name!r} is not a state"]
        order.append(name)
        state = states[name]
        providers = (COMPUTE_URL, TRANSFER_URL)
        if state.get("Type") != "Action" or state.get("ActionUrl") not in providers:
            problems.append(f"{name}: not an action of Globus Compute or Transfer")
        if state.get("ResultPath") != f"$.{name}":
            problems.append(f"{name}: ResultPath {state.get('ResultPath')!r}, not $.{name}")
        for ref in _refs(state.get("Parameters", {})):
            root = ref.removeprefix("$.").split(".")[0].split("[")[0]
            if root not in schema["properties"] and root not in order[:-1]:
                problems.append(f"{name}: reads {ref}, neither input nor an earlier result")
        name = state.get("Next")
        if name is None and not state.get("End"):
            problems.append(f"{order[-1]}: neither Next nor End")
    unreached = sorted(set(states) - set(order))
    problems += [f"state {n} is never reached" for n in unreached]
    return problems


def flow_file(cfg: Config) -> Path:
    return cfg.registry_path / FLOW_FILE


def deploy(cfg: Config, flows_client, compute_client) -> dict:
    """Register the task functions with Globus Compute, create the flow, and keep what a
    run needs in ``flow.json``; returns it (``flow_id``, ``scope``, the function ids)."""
    ids = {field: compute_client.register_function(fn) for field, fn in FUNCTIONS.items()}
    transfer = cfg.remote.staging == "globus"
    definition = flow_definition(transfer)
    problems = check_definition(definition)
    if problems:
        raise RetrainError(f"the flow definition is wrong: {problems}")
    flow = flows_client.create_flow(
        title="edgeloop retraining",
        subtitle="Analyze (labels) and train on a Globus Compute endpoint"
        + (", scans in and labels back by Globus Transfer" if transfer else ""),
        definition=definition,
        input_schema=INPUT_SCHEMA,
        keywords=["edgeloop", "ptychography", "hedm", "retraining"],
    )
    kept = {
        "flow_id": flow["id"],
        "scope": flow.get("globus_auth_scope"),
        "transfer": transfer,
        **ids,
    }
    atomic_write(flow_file(cfg), json.dumps(kept, indent=2).encode())
    return kept


def deployed(cfg: Config) -> dict:
    try:
        return json.loads(flow_file(cfg).read_text())
    except (OSError, ValueError) as exc:
        raise RetrainError(
            f"no Globus Flow deployed ({flow_file(cfg)}: {exc}); run `edgeloop flows deploy` once"
        ) from exc


class GlobusFlows:
    """The executor ``globus-flows``: :meth:`retrain` runs the deployed flow once and
    follows it. ``run_client(flow_id, scope)`` gives a ``SpecificFlowClient``."""

    runs_whole_retraining = True

    def __init__(self, cfg: Config, flows_client, run_client, poll_s: float = 5.0):
        self.cfg, self.flows, self.run_client, self.poll_s = cfg, flows_client, run_client, poll_s
        self.flow = deployed(cfg)

    def submit(self, fn, *args):  # noqa: ARG002
        raise RetrainError("the globus-flows executor runs whole retraining flows only")

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass

    def retrain(
        self, analysis: dict, train: dict, where, progress, abort: threading.Event, timeout: float
    ) -> tuple[dict, dict]:
        """(Analyze's output, Train's) of one run; RetrainError if it fails or outlasts
        ``timeout``, Aborted (the run cancelled) once ``abort`` is set."""
        body = {
            "compute_endpoint": self.cfg.remote.globus_endpoint_id,
            "analyze_function_id": self.flow["analyze_function_id"],
            "train_function_id": self.flow["train_function_id"],
            "analysis": analysis,
            "train": train,
        }
        if self.flow.get("transfer"):
            where.bring_back(analysis["out"])
            body.update(
                source_collection=self.cfg.remote.globus_source_collection,
                dest_collection=self.cfg.remote.globus_dest_collection,
                transfer_in=where.transfer_in,
                transfer_back=where.transfer_back,
            )
        client = self.run_client(self.flow["flow_id"], self.flow.get("scope"))
        try:
            run = client.run_flow(
                body,
                label=f"edgeloop {train['kind']} retraining",
                tags=["edgeloop", train["kind"], train["request_id"]],
            )
        except Exception as exc:  # GlobusAPIError, network
            raise RetrainError(f"the Globus Flow did not start: {exc}") from exc
        run_id = run["run_id"]
        log.info("Globus flow run %s started", run_id)
        doc = self._follow(run_id, progress, abort, time.monotonic() + timeout)
        output = doc.get("details", {}).get("output", {})
        try:
            labels = output["Analyze"]["details"]["results"][0]["output"]
            result = dict(output["Train"]["details"]["results"][0]["output"])
            result["model"] = base64.b64decode(result.pop("model_b64"))
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise RetrainError(f"flow run {run_id} succeeded without results: {exc!r}") from exc
        return labels, result

    def _follow(self, run_id: str, progress, abort, deadline: float) -> dict:
        shown = None
        while True:
            if abort.is_set():
                self._cancel(run_id)
                raise Aborted(f"Globus flow run {run_id} cancelled by ml:Abort")
            if time.monotonic() > deadline:
                self._cancel(run_id)
                raise RetrainError(f"Globus flow run {run_id} exceeded its time limit (cancelled)")
            try:
                doc = self.flows.get_run(run_id)
            except Exception as exc:  # the service not answering: the run goes on there
                log.warning("Globus flow run %s: no status now (%s)", run_id, exc)
                abort.wait(self.poll_s)
                continue
            status = doc["status"]
            if status == "SUCCEEDED":
                return doc
            if status in ("FAILED", "ENDED"):
                details = doc.get("details", {})
                why = details.get("description") or json.dumps(details)[:300]
                raise RetrainError(f"Globus flow run {run_id} {status}: {why}")
            state = self._state(run_id)
            if (state, status) != shown:
                shown = (state, status)
                note = " (waiting for a consent or credentials)" if status == "INACTIVE" else ""
                progress.enter(
                    STEPS.get(state, "Training"),
                    f"Globus flow run {run_id}: {state or 'starting'} ({status}){note}",
                )
            abort.wait(self.poll_s)

    def _state(self, run_id: str) -> str | None:
        """The state the run is in: the newest log entry that names one."""
        try:
            entries = self.flows.get_run_logs(run_id, reverse_order=True)["entries"]
        except Exception:
            return None
        for entry in entries:
            name = entry.get("details", {}).get("state_name")
            if name:
                return name
        return None

    def _cancel(self, run_id: str) -> None:
        try:
            self.flows.cancel_run(run_id)
        except Exception as exc:
            log.error("Globus flow run %s could not be cancelled: %s", run_id, exc)


def clients(cfg: Config):
    """(FlowsClient, run_client) authorised as the service's Globus login (the app of
    remote/globus_login.py, Transfer's, asking for the Flows scopes and the flow's own)."""
    globus_sdk = require("globus_sdk", "globus")
    from edgeloop.remote.globus_login import transfer_app

    app, _ = transfer_app(cfg)
    flows = globus_sdk.FlowsClient(app=app)

    def run_client(flow_id: str, scope: str | None):
        return globus_sdk.SpecificFlowClient(flow_id, app=app)

    return app, flows, run_client


def login(cfg: Config) -> None:
    """``edgeloop globus login`` with executor globus-flows: Transfer's consents, the Flows
    service's, and, once the flow is deployed, the flow's own run scope."""
    app, _, run_client = clients(cfg)
    if flow_file(cfg).exists():
        run_client(deployed(cfg)["flow_id"], None)  # registers the flow's scope with the app
    app.login()


def compute_client():
    """globus_compute_sdk's Client on its own stored login (``globus-compute-endpoint
    login``), as the globus-compute executor uses it."""
    require("globus_compute_sdk", "globus")
    from globus_compute_sdk import Client
    from globus_compute_sdk.sdk.auth.globus_app import get_globus_app

    return Client(app=get_globus_app(), do_version_check=False)


def flows_executor(cfg: Config) -> GlobusFlows:
    if not cfg.remote.globus_endpoint_id:
        raise ValueError("executor 'globus-flows' needs remote.globus_endpoint_id")
    _, flows, run_client = clients(cfg)
    return GlobusFlows(cfg, flows, run_client)
