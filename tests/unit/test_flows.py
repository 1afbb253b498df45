"""The retraining as one Globus Flow (issue 24, item 1), offline: the generated definition
checked (states, the inputs they read, the input schema), ``edgeloop flows deploy`` and a
whole retraining driven against globus-sdk's own testing responses (``globus_sdk.testing``
over ``responses``): the flow service's answers for create/run/cancel are the SDK's; the
run's status and output are what its Analyze and Train states return, computed by running
the real task functions on a real scan as the Compute endpoint would. The returned model
then goes through the same validation, gate, signature and deploy as any executor's."""

import json
import threading
import uuid

import globus_sdk
import jsonschema
import pytest
import responses
from globus_sdk.testing import load_response

from edgeloop import approval
from edgeloop.config import Config
from edgeloop.registry import Registry
from edgeloop.remote import flows, tasks
from edgeloop.remote.errors import Aborted, RetrainError
from edgeloop.remote.executor_slot import ExecutorSlot
from edgeloop.remote.pipeline import RetrainPipeline
from tests.kit.loops import hedm_pipeline_config
from tests.kit.progress import Recorder

pytestmark = pytest.mark.timeout(300)
BASE = "https://flows.automate.globus.org"


@pytest.mark.parametrize("transfer", [False, True])
def test_the_definition_chains_the_task_functions_and_reads_only_declared_input(transfer):
    d = flows.flow_definition(transfer)
    assert flows.check_definition(d) == []
    order, name = [], d["StartAt"]
    while name:
        order.append(name)
        name = d["States"][name].get("Next")
    expected = ["Analyze", "Train"]
    assert order == (["TransferIn", *expected, "TransferBack"] if transfer else expected)
    train = d["States"]["Train"]["Parameters"]["tasks"][0]
    assert train["function.$"] == "$.train_function_id"
    assert train["kwargs"]["labels.$"] == "$.Analyze.details.results[0].output"
    jsonschema.Draft7Validator.check_schema(flows.INPUT_SCHEMA)
    # a definition that reads what nobody gives, or loses a state, is caught
    bad = json.loads(json.dumps(d))
    bad["States"]["Train"]["Parameters"]["tasks"][0]["kwargs"]["labels.$"] = "$.Nowhere.x"
    bad["States"]["Analyze"]["Next"] = "Missing"
    problems = flows.check_definition(bad)
    assert any("Missing" in p for p in problems), problems
    bad["States"]["Analyze"]["Next"] = "Train"
    assert any("$.Nowhere.x" in p for p in flows.check_definition(bad))


class ComputeRegistrar:
    """What deploy asks of globus_compute_sdk.Client: register a function, get its id."""

    def __init__(self):
        self.registered = []

    def register_function(self, fn):
        self.registered.append(fn.__name__)
        return str(uuid.uuid4())


@pytest.fixture
def flow_pipeline(tmp_path):
    cfg = hedm_pipeline_config(tmp_path)
    cfg.executor = "globus-flows"
    cfg.remote.globus_endpoint_id = str(uuid.uuid4())
    registry = Registry(cfg.registry_path)
    deployed = []

    def deploy(version):
        deployed.append(version)
        registry.mark_accepted(version)

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rm:
        load_response("flows.create_flow", requests_mock=rm)
        fc = globus_sdk.FlowsClient(authorizer=globus_sdk.NullAuthorizer())
        registrar = ComputeRegistrar()
        kept = flows.deploy(cfg, fc, registrar)
        run_meta = load_response("flows.run_flow", requests_mock=rm).metadata
        load_response("flows.cancel_run", requests_mock=rm)

        def run_client(flow_id, scope):
            return globus_sdk.SpecificFlowClient(flow_id, authorizer=globus_sdk.NullAuthorizer())

        executor = flows.GlobusFlows(cfg, fc, run_client, poll_s=0.05)
        slot = ExecutorSlot("globus-flows", lambda name: executor, executor)
        pipe = RetrainPipeline(cfg, registry, slot, Recorder(), deploy)
        pipe.deployed, pipe.rm, pipe.kept, pipe.registrar = deployed, rm, kept, registrar
        pipe.flow_id = run_meta["flow_id"]
        yield pipe


class FlowService:
    """The flow service's run while it runs: get_run and its log, answered from what the
    states did; Analyze and Train are the task functions, run here on the run's input."""

    def __init__(self, rm, run_id, fail: str | None = None, hold: threading.Event | None = None):
        self.rm, self.run_id, self.fail, self.hold = rm, run_id, fail, hold
        self.polls, self.state, self.labels, self.output = 0, "Analyze", None, None
        rm.add_callback(responses.GET, f"{BASE}/runs/{run_id}", self.get_run)
        rm.add_callback(responses.GET, f"{BASE}/runs/{run_id}/log", self.get_log)

    def body(self) -> dict:
        (call,) = [c for c in self.rm.calls if c.request.url.endswith("/run")]
        return json.loads(call.request.body)["body"]

    def get_run(self, request):
        self.polls += 1
        doc = {"run_id": self.run_id, "status": "ACTIVE", "details": {"code": "ActionStarted"}}
        if self.hold is not None or self.polls < 3:
            return 200, {}, json.dumps(doc)
        if self.fail:
            doc.update(status="FAILED", details={"code": "ActionFailedException",
                                                 "description": self.fail})  # fmt: skip
            return 200, {}, json.dumps(doc)
        if self.labels is None:  # Analyze ends, Train starts
            self.labels, self.state = tasks.analyze(self.body()["analysis"]), "Train"
            return 200, {}, json.dumps(doc)
        if self.output is None:
            body = self.body()
            trained = tasks.train_on_labels(body["train"], self.labels)
            result = lambda out: {"status": "SUCCEEDED", "details": {"results": [{"output": out}]}}  # noqa: E731
            self.output = {"Analyze": result(self.labels), "Train": result(trained), **body}
        doc.update(status="SUCCEEDED", details={"code": "FlowSucceeded", "output": self.output})
        return 200, {}, json.dumps(doc)

    def get_log(self, request):
        entry = {"code": "ActionStarted", "details": {"state_name": self.state}}
        return 200, {}, json.dumps({"entries": [entry], "has_next_page": False, "limit": 10})


def test_deploy_registers_the_task_functions_and_creates_the_flow(flow_pipeline):
    p = flow_pipeline
    assert p.registrar.registered == ["analyze", "train_on_labels"]
    (call,) = [c for c in p.rm.calls if c.request.url == f"{BASE}/flows"]
    sent = json.loads(call.request.body)
    assert sent["definition"] == flows.flow_definition(False)
    assert sent["input_schema"] == flows.INPUT_SCHEMA
    assert flows.deployed(p.cfg)["flow_id"] == p.flow_id == p.kept["flow_id"]


def test_a_retraining_runs_as_one_flow_and_its_model_is_gated_signed_and_deployed(flow_pipeline):
    p = flow_pipeline
    service = FlowService(p.rm, "36ad9f9a-ad29-488f-beb4-c22ab729643a")
    result = p.run("a flow test")
    body = service.body()
    jsonschema.validate(body, flows.INPUT_SCHEMA)  # what the service sends, as declared
    assert body["compute_endpoint"] == p.cfg.remote.globus_endpoint_id
    assert body["train"]["labels"] is None and len(body["train"]["request_id"]) == 32
    assert body["analysis"]["kind"] == "braggnn"
    assert "Analyzing" in p.progress.states and "Training" in p.progress.states
    assert any(f"Globus flow run {service.run_id}: Analyze (ACTIVE)" in m
               for m in p.progress.messages)  # fmt: skip
    assert result["version"] == 1 and p.deployed == [1]
    meta = p.registry.meta(1)
    assert meta["executor"] == "globus-flows"
    fields = approval.check(approval.public_key(p.cfg.security), meta, 1)
    assert fields["labels_sha256"] == meta["labels_sha256"]
    assert fields["request_id"] == body["train"]["request_id"]


def test_a_failed_flow_run_is_an_error_with_the_services_reason(flow_pipeline):
    p = flow_pipeline
    FlowService(p.rm, "36ad9f9a-ad29-488f-beb4-c22ab729643a", fail="endpoint offline")
    with pytest.raises(RetrainError, match="FAILED: endpoint offline"):
        p.run("fails")
    assert p.deployed == [] and p.registry.versions() == []


def test_an_abort_cancels_the_flow_run(flow_pipeline):
    p = flow_pipeline
    service = FlowService(p.rm, "36ad9f9a-ad29-488f-beb4-c22ab729643a", hold=threading.Event())
    enter = p.progress.enter

    def abort_once_running(state, message):
        enter(state, message)
        if "Globus flow run" in message:
            p.abort.set()

    p.progress.enter = abort_once_running
    with pytest.raises(Aborted, match="cancelled by ml:Abort"):
        p.run("aborted")
    cancels = [c for c in p.rm.calls if c.request.url.endswith(f"/runs/{service.run_id}/cancel")]
    assert len(cancels) == 1 and p.deployed == []


def test_no_deployed_flow_is_refused_naming_the_command(tmp_path):
    cfg = Config(registry_dir=str(tmp_path / "m"))
    with pytest.raises(RetrainError, match="edgeloop flows deploy"):
        flows.GlobusFlows(cfg, None, None)


def test_with_globus_staging_the_flow_makes_the_transfers(tmp_path):
    """FlowStaging hands the flow its TransferIn and TransferBack items; nothing is sent by
    the service (it has no Transfer client here)."""
    from edgeloop.remote.staging import FlowStaging, staging

    cfg = hedm_pipeline_config(tmp_path)
    cfg.remote.staging = "globus"
    cfg.remote.globus_source_collection = str(uuid.uuid4())
    cfg.remote.globus_dest_collection = str(uuid.uuid4())
    cfg.remote.globus_dest_dir = "/scratch/edgeloop"
    where = staging(cfg, by_flow=True)
    assert isinstance(where, FlowStaging)
    (scan,) = [str(p) for p in cfg.data_path.glob("*.h5")]
    there = where.scans([scan])
    assert there[0].startswith("/scratch/edgeloop/")
    out = where.labels_out("labels_braggnn_1.h5")
    where.bring_back(out)
    assert {i["destination_path"] for i in where.transfer_in} >= set(there)
    assert where.transfer_back == [
        {"source_path": out, "destination_path": where.labels_here(out)}
    ]
    assert flows.check_definition(flows.flow_definition(True)) == []
