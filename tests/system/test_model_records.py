"""Model records in use (issue 24, items 3 and 4): a version the edge serves, its record
exported by ``edgeloop models export`` and loaded in a fresh process with onnxruntime alone
(edgeloop cannot be imported there), answering real APS frames as the edge did."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeloop import model_records as records
from edgeloop import ntnd
from edgeloop.app.answers import AnswerCollector
from edgeloop.app.processes import ManagedProcess
from edgeloop.edge_pva.tolerance import violations
from edgeloop.models import BraggNN, PtychoNN
from edgeloop.registry import Registry, model_to_bytes
from edgeloop.waiting import wait_until
from tests.kit.answers import post
from tests.kit.env import DEADLINE_SLACK, KIT, SHARED_DATA, free_port, random_prefix
from tests.kit.models import add_approved
from tests.kit.servers import small_config

pytest.importorskip("onnxruntime")
pytestmark = [pytest.mark.timeout(600)]
APS = SHARED_DATA / "aps-ptycho-test235.npz"


def test_an_exported_record_answers_as_the_edge_with_onnxruntime_alone(tmp_path):
    from tests.kit.isolated import IsolatedEdge

    cfg, path = small_config(tmp_path, random_prefix("m"))
    torch.manual_seed(3)
    net = PtychoNN(**cfg.arch("ptychonn"))
    data = model_to_bytes("ptychonn", cfg.arch("ptychonn"), net)
    version = add_approved(Registry(cfg.registry_path), data, {"kind": "ptychonn"}, cfg.security)
    frames = np.load(APS)["reciprocal"][:8]
    edge = IsolatedEdge(cfg)
    try:
        edge.edge.load_version(version)
        edge.wait_value("edge:ModelVersion", lambda v: v == version, 30)
        out = AnswerCollector(edge.ctx, f"{edge.prefix}edge:Phase").wait_connected()
        for i, frame in enumerate(frames):
            post(edge.source, ntnd.build(frame, i + 1, {"SampleX": 0.0, "SampleY": 0.0}))
            time.sleep(0.01)
        served = out.wait_ids(range(1, len(frames) + 1))
        out.close()
    finally:
        edge.close()
    assert Registry(cfg.registry_path).accepted("ptychonn") == version
    folder = records.write_record(cfg, version)  # as the service does once the edge accepts
    cli = [sys.executable, "-m", "edgeloop.app.cli", "models", "--config", str(path)]
    done = subprocess.run(
        [*cli, "export", str(version), "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    archive = tmp_path / f"{folder.name}.tar.gz"
    assert archive.exists(), done.stdout
    np.save(tmp_path / "frames.npy", frames)
    alone = subprocess.run(
        [sys.executable, "-I", str(KIT / "onnx_only.py"), str(archive),
         str(tmp_path / "frames.npy"), str(tmp_path / "out.npz")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert alone.returncode == 0, alone.stdout + alone.stderr
    assert "edgeloop not imported" in alone.stdout
    phase = np.load(tmp_path / "out.npz")["phase"][:, 0]
    edge_phase = np.stack([served[i + 1].data for i in range(len(frames))])
    assert phase.shape == edge_phase.shape
    problems = violations("ptychonn", "fp32", ("phase",), [phase], [edge_phase])
    assert not problems, problems


MLFLOW = Path(__file__).resolve().parents[2] / ".venv-mlflow" / "bin" / "mlflow"


@pytest.fixture
def mlflow_server(tmp_path):
    """A stock MLflow tracking server (its own environment: make system-deps), SQLite
    backend and artifacts under tmp_path, on loopback."""
    import urllib.request

    if not MLFLOW.exists():
        pytest.fail(f"{MLFLOW} is missing: `make system-deps` installs the MLflow server")
    port = free_port()
    args = ["server", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
            "--artifacts-destination", str(tmp_path / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    proc = ManagedProcess("mlflow", args, tmp_path / "mlflow.log", program=[str(MLFLOW)])

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_until(healthy, 60 * DEADLINE_SLACK, "the MLflow server", 0.5,
                   lambda: proc.output()[-2000:])  # fmt: skip
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def test_records_round_trip_through_mlflow_and_follow_the_edges_states(tmp_path, mlflow_server):
    """Issue 24, item 4: two accepted versions pushed (the second serving), then the second
    withdrawn and the first back; MLflow's status tags and ``serving`` alias follow, and
    the record downloaded from MLflow verifies against the gate's key."""
    import mlflow
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.tracking import MlflowClient

    from edgeloop import approval
    from edgeloop.remote import mlflow_registry

    cfg, path = small_config(tmp_path, random_prefix("l"))
    cfg.records.mlflow_uri = mlflow_server
    cfg.dump(path)
    registry = Registry(cfg.registry_path)
    versions = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        data = model_to_bytes("braggnn", cfg.arch("braggnn"), BraggNN(**cfg.arch("braggnn")))
        meta = {"kind": "braggnn", "arch": cfg.arch("braggnn"), "val_loss": 0.001 * seed}
        v = add_approved(registry, data, meta, cfg.security)
        registry.mark_accepted(v)
        records.write_record(cfg, v, registry)
        versions.append(v)
    first, second = versions
    cli = [sys.executable, "-m", "edgeloop.app.cli", "models", "--config", str(path), "push"]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    name = mlflow_registry.model_name("braggnn")

    def states() -> dict[int, tuple[str, str]]:
        return {
            int(mv.tags["edgeloop.version"]): (mv.version, mv.tags["edgeloop.status"])
            for mv in client.search_model_versions(f"name = '{name}'")
        }

    assert {v: s for v, (_, s) in states().items()} == {first: "accepted", second: "accepted"}
    assert client.get_model_version_by_alias(name, "serving").version == states()[second][0]
    run = client.get_run(client.get_model_version_by_alias(name, "serving").run_id)
    assert run.data.metrics["held_out_loss"] == pytest.approx(0.002)
    # the edge withdraws the second (an abort after it loaded), the first serves again
    registry.mark_rejected(second, "withdrawn by ml:Abort")
    registry.mark_accepted(first)
    mlflow_registry.sync(cfg)
    assert {v: s for v, (_, s) in states().items()} == {first: "accepted", second: "rejected"}
    assert len(client.search_model_versions(f"name = '{name}'")) == 2  # nothing pushed twice
    serving = client.get_model_version_by_alias(name, "serving")
    assert serving.version == states()[first][0]
    mlflow.set_tracking_uri(mlflow_server)
    repo = get_artifact_repository(serving.source)
    (tmp_path / "dl").mkdir()
    try:
        got = Path(repo.download_artifacts("", dst_path=str(tmp_path / "dl")))
    finally:
        repo.thread_pool.shutdown(wait=True)
    verdict = records.verify_record(got, approval.key_paths(cfg.security)[1].read_bytes())
    assert verdict.ok, verdict.problems
    assert json.loads((got / "card.json").read_text())["version"] == first


def test_a_down_mlflow_server_costs_seconds_and_loses_nothing(tmp_path):
    """The service's sync against a port nothing listens on fails quickly, with the reason."""
    from edgeloop.remote import mlflow_registry

    cfg, _ = small_config(tmp_path, random_prefix("d"))
    cfg.records.mlflow_uri = f"http://127.0.0.1:{free_port()}"
    registry = Registry(cfg.registry_path)
    data = model_to_bytes("braggnn", cfg.arch("braggnn"), BraggNN(**cfg.arch("braggnn")))
    v = add_approved(
        registry, data, {"kind": "braggnn", "arch": cfg.arch("braggnn")}, cfg.security
    )
    registry.mark_accepted(v)
    folder = records.write_record(cfg, v, registry)
    t0 = time.monotonic()
    with pytest.raises(Exception, match="127.0.0.1"):
        mlflow_registry.sync(cfg)
    print(f"a down MLflow server: sync failed after {time.monotonic() - t0:.1f} s")
    assert records.verify_record(folder).ok
