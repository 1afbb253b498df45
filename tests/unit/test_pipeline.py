"""One retraining without EPICS: the pipeline on a plain ThreadPoolExecutor, real analysis
(pseudo-Voigt fits) and real training of BraggNN on a simulated HEDM scan; what it reports,
what it deploys, the gate and an abort."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from edgeloop import approval
from edgeloop.edge_pva.inference import ModelRejected
from edgeloop.registry import NOT_NOW, Registry
from edgeloop.remote import pipeline as pipeline_module
from edgeloop.remote.errors import Aborted, RetrainError
from edgeloop.remote.executor_slot import ExecutorSlot
from edgeloop.remote.pipeline import RetrainPipeline
from tests.kit.loops import hedm_pipeline_config
from tests.kit.progress import Recorder

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def pipeline(tmp_path):
    cfg = hedm_pipeline_config(tmp_path)
    registry = Registry(cfg.registry_path)
    deployed = []

    def deploy(version):  # what the edge does once a version serves
        deployed.append(version)
        registry.mark_accepted(version)

    pool = ThreadPoolExecutor(1)
    slot = ExecutorSlot("threads", lambda name: ThreadPoolExecutor(1), pool)
    pipe = RetrainPipeline(cfg, registry, slot, Recorder(), deploy)
    pipe.deployed = deployed
    yield pipe
    slot.shutdown()


def test_a_retraining_stages_analyses_trains_validates_and_deploys(pipeline):
    result = pipeline.run("a test")
    steps = ["Staging", "Analyzing", "Training", "Validating", "Deploying"]
    assert pipeline.progress.states == steps
    assert result["version"] == 1 and result["kind"] == "braggnn"
    assert pipeline.deployed == [1] and pipeline.registry.accepted("braggnn") == 1
    assert pipeline.progress.figures["trigger"] == "a test"
    assert pipeline.progress.figures["val_loss"] == result["val_loss"] > 0
    meta = pipeline.registry.meta(1)
    assert meta["trigger"] == "a test" and meta["executor"] == "threads"
    assert meta["parent"] is None and meta["baseline"] is None
    # the gate signed it: what the edge checks before it loads it
    public = approval.public_key(pipeline.cfg.security)
    fields = approval.check(public, meta, 1)
    assert fields["labels_sha256"] == meta["labels_sha256"] and len(fields["request_id"]) == 32
    assert fields["parent"] is None and fields["sha256"] == meta["sha256"]
    assert set(result["timings"]) >= {"staging_s", "analysis_s", "training_s", "return_s"}

    # the next one starts from v1 and is gated against it: a model worse than v1 by the
    # service's own figures is rejected and never deployed
    pipeline.cfg.remote.quality_margin = -0.999  # only a 1000x better model would pass
    with pytest.raises(RetrainError, match="v2 not deployed: quality gate"):
        pipeline.run("again")
    assert pipeline.deployed == [1] and pipeline.registry.meta(2)["status"] == "rejected"
    assert pipeline.registry.meta(2)["parent"] == 1
    assert "approval" not in pipeline.registry.meta(2)  # the gate signs only what it passes


def test_an_abort_during_a_step_ends_the_run_and_deploys_nothing(pipeline):
    started = threading.Event()
    train = pipeline.progress.enter

    def enter(state, message):
        train(state, message)
        if state == "Training":
            started.set()
            pipeline.abort.set()

    pipeline.progress.enter = enter
    with pytest.raises(Aborted, match="training aborted by ml:Abort"):
        pipeline.run("to abort")
    assert started.is_set() and pipeline.deployed == []


def test_no_scans_is_an_error_that_says_where_it_looked(pipeline, tmp_path):
    pipeline.cfg.data_dir = str(tmp_path / "empty")
    with pytest.raises(RetrainError, match="no scans to train on"):
        pipeline.run("nothing")
    assert pipeline.progress.states == ["Staging"]


def test_a_version_the_edge_cannot_load_now_is_deployed_again_later(pipeline, monkeypatch):
    """Out of memory while the edge tries a version rejects nothing (issue 22 item 7): the
    edge says "not loaded now" and the pipeline loads it again after a wait."""
    monkeypatch.setattr(pipeline_module, "DEPLOY_RETRY_S", (0.01, 0.01, 0.01))
    load, refusals = pipeline.deploy, []

    def deploy(version):  # the edge's answer to the first two tries (edge_pva/model_loader)
        if len(refusals) < 2:
            refusals.append(version)
            raise RuntimeError(f"model v{version} {NOT_NOW} (MemoryError: ); still serving v0")
        load(version)

    pipeline.deploy = deploy
    result = pipeline.run("after a transient refusal")
    assert refusals == [1, 1] and pipeline.deployed == [1] == [result["version"]]
    assert pipeline.registry.accepted("braggnn") == 1


def test_a_rejection_or_a_refusal_that_lasts_ends_the_run(pipeline, monkeypatch):
    monkeypatch.setattr(pipeline_module, "DEPLOY_RETRY_S", (0.01,))
    tries = []

    def deploy(version):
        tries.append(version)
        raise RuntimeError(f"model v{version} {NOT_NOW} (OSError: disk gone)")

    pipeline.deploy = deploy
    with pytest.raises(RetrainError, match="edge refused model v1: .*not loaded now"):
        pipeline.run("memory never comes back")
    assert tries == [1, 1]  # one try, one retry
    tries.clear()

    def rejected(version):
        tries.append(version)
        raise ModelRejected(f"model v{version} rejected: phase output has NaN or Inf")

    pipeline.deploy = rejected
    with pytest.raises(RetrainError, match="edge refused model v2: .*NaN"):
        pipeline.run("a bad model")
    assert tries == [2]  # not retried


def test_the_accepted_version_gets_its_record_and_one_that_fails_only_says_so(
    pipeline, monkeypatch
):
    from edgeloop import model_records

    result = pipeline.run("records")
    assert result["record_problem"] is None
    assert model_records.verify_record(model_records.find(pipeline.cfg, 1)).ok

    def no_onnx(*args, **kwargs):
        raise ImportError("onnx is not installed; it comes with pip install 'edgeloop[onnx]'")

    monkeypatch.setattr(model_records, "onnx_graph", no_onnx)
    pipeline.cfg.remote.quality_margin = 10.0  # whatever its loss, v2 passes the gate
    result = pipeline.run("no onnx")
    assert result["version"] == 2 and pipeline.registry.accepted("braggnn") == 2  # it serves
    assert (
        "no model record" in result["record_problem"]
        and "edgeloop[onnx]" in result["record_problem"]
    )


def test_a_changed_architecture_trains_from_scratch(pipeline):
    """The configured network wins: after the width changes, the accepted model of the old
    width is not the next one's starting point (its arch would win over the config's)."""
    assert pipeline.run("first")["version"] == 1
    pipeline.cfg.model.braggnn_width = 8
    pipeline.cfg.remote.quality_margin = 10.0
    result = pipeline.run("narrower")
    meta = pipeline.registry.meta(result["version"])
    assert meta["arch"]["width"] == 8 and meta["parent"] is None
    assert any("v1" in m and "skipped" in m for m in pipeline.progress.messages)
