"""Model records (issue 24, items 2 and 3): written from an approved version, verified,
refused when altered or re-signed, exported and unpacked, listed with filters; the ONNX
graph carries its metadata and gives the torch model's answers."""

import json
import tarfile
import time

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeloop import model_records as records
from edgeloop.app.cli import main
from edgeloop.models import BraggNN, PtychoNN
from edgeloop.registry import Registry, model_to_bytes
from tests.kit.models import add_approved
from tests.kit.servers import small_config

pytest.importorskip("onnxruntime")


@pytest.fixture
def reg(tmp_path):
    cfg, path = small_config(tmp_path, "R:")
    cfg.model.input_size = 32
    cfg.dump(path)
    registry = Registry(cfg.registry_path)
    torch.manual_seed(0)
    nets = {
        "ptychonn": PtychoNN(**cfg.arch("ptychonn")),
        "braggnn": BraggNN(**cfg.arch("braggnn")),
    }
    versions = {}
    for i, (kind, net) in enumerate(nets.items()):
        meta = {
            "kind": kind,
            "arch": cfg.arch(kind),
            "val_loss": 0.02 / (i + 1),
            "trained_on": ["/data/run_00001_abcd.json"],
            "runs": [{"ref": "/data/run_00001_abcd.json", "uid": "abcd-uid", "frames": 40}],
            "n_frames": 40,
            "labels_sha256": "0" * 64,
            "labels_method": {"method": "phase retrieval (LSQML)", "settings": {"epochs": 8}},
            "parent": None,
            "code_version": "0.1.0+gtest",
        }
        version = add_approved(
            registry, model_to_bytes(kind, cfg.arch(kind), net), meta, cfg.security
        )
        registry.mark_accepted(version)
        versions[kind] = version
    return cfg, path, registry, nets, versions


def test_a_record_holds_the_graph_the_card_and_verifies(reg):
    import onnx
    import onnxruntime as ort

    cfg, _, registry, nets, versions = reg
    folder = records.write_record(cfg, versions["ptychonn"], registry)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*records.FILES, records.SUMS, records.SUMS_SIG]
    )
    card = json.loads((folder / "card.json").read_text())
    assert card["kind"] == "ptychonn" and card["version"] == versions["ptychonn"]
    assert card["training_data"]["runs"][0]["uid"] == "abcd-uid"
    assert card["training_data"]["labels"]["sha256"] == "0" * 64
    assert card["metrics"]["held_out_loss"] == 0.02 and card["licence"] == "CC-BY-4.0"
    assert card["approval"]["fields"]["sha256"] == registry.meta(versions["ptychonn"])["sha256"]
    props = {p.key: p.value for p in onnx.load(folder / "model.onnx").metadata_props}
    assert props["edgeloop.kind"] == "ptychonn"
    outputs = json.loads(props["edgeloop.outputs"])
    assert [(o["name"], o["meaning"]) for o in outputs] == [("y0", "amplitude"), ("y1", "phase")]
    assert "rad" in outputs[1]["units"]
    verdict = records.verify_record(
        folder, records.approval.key_paths(cfg.security)[1].read_bytes()
    )
    assert verdict.ok, verdict.problems
    # the graph gives the torch network's answers
    x = np.random.default_rng(1).random((3, 1, 32, 32), np.float32)
    got = ort.InferenceSession(str(folder / "model.onnx")).run(None, {"x": x})
    with torch.no_grad():
        want = [t.numpy() for t in nets["ptychonn"].eval()(torch.from_numpy(x))]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4)
    assert "sha256sum -c SHA256SUMS" in (folder / "README.md").read_text()


@pytest.mark.parametrize(
    "tamper, problem",
    [
        (lambda f: (f / "model.onnx").write_bytes(b"not onnx"), "model.onnx: sha256"),
        (lambda f: (f / "extra.bin").write_bytes(b"x"), "extra.bin: not covered"),
        (lambda f: (f / "weights.pt").unlink(), "weights.pt: unreadable"),
        (lambda f: (f / records.SUMS_SIG).write_text("00" * 64), "SHA256SUMS.sig: does not"),
    ],
)
def test_an_altered_record_is_refused(reg, tamper, problem):
    cfg, _, registry, _, versions = reg
    folder = records.write_record(cfg, versions["braggnn"], registry)
    tamper(folder)
    verdict = records.verify_record(folder)
    assert not verdict.ok and any(problem in p for p in verdict.problems), verdict.problems


def test_a_record_resigned_with_another_key_fails_against_the_gates(reg):
    """Rewritten sums and a new key pair make a record whole again, but not the gate's."""
    cfg, _, registry, _, versions = reg
    folder = records.write_record(cfg, versions["braggnn"], registry)
    card = json.loads((folder / "card.json").read_text())
    card["metrics"]["held_out_loss"] = 1e-9  # a better figure than it earned
    (folder / "card.json").write_text(json.dumps(card))
    other = Ed25519PrivateKey.generate()
    (folder / "gate.pub").write_bytes(
        other.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    sums = records._sums(folder, records.FILES)
    (folder / records.SUMS).write_bytes(sums)
    (folder / records.SUMS_SIG).write_text(other.sign(sums).hex())
    gate_pub = records.approval.key_paths(cfg.security)[1].read_bytes()
    verdict = records.verify_record(folder, gate_pub)
    assert not verdict.ok and any("SHA256SUMS.sig" in p for p in verdict.problems)
    # against its own key it is whole, but the weights' approval is the gate's, not its
    alone = records.verify_record(folder)
    assert any("approval" in p for p in alone.problems), alone.problems


def test_an_unapproved_version_gets_no_record(reg):
    cfg, _, registry, nets, _ = reg
    data = model_to_bytes("braggnn", cfg.arch("braggnn"), nets["braggnn"])
    planted = registry.add(data, {"kind": "braggnn", "arch": cfg.arch("braggnn")})
    with pytest.raises(records.RecordError, match="approval"):
        records.write_record(cfg, planted, registry)


def test_the_cli_lists_shows_exports_and_verifies(reg, tmp_path, capsys):
    cfg, path, registry, _, versions = reg
    v_p, v_b = versions["ptychonn"], versions["braggnn"]
    main(["models", "--config", str(path), "record", str(v_p), str(v_b)])
    main(["models", "--config", str(path), "list", "--kind", "braggnn", "--json"])
    rows = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert [r["version"] for r in rows] == [v_b] and rows[0]["record"]
    main(["models", "--config", str(path), "list", "--where", "val_loss<0.015", "--json"])
    assert [r["version"] for r in json.loads(capsys.readouterr().out)] == [v_b]
    tomorrow = time.strftime("%Y-%m-%d", time.localtime(time.time() + 86400))
    main(["models", "--config", str(path), "list", "--since", tomorrow, "--json"])
    assert json.loads(capsys.readouterr().out) == []
    main(["models", "--config", str(path), "list", "--status", "accepted"])
    table = capsys.readouterr().out
    assert f"{v_p}" in table and "ptychonn" in table and "braggnn" in table
    main(["models", "--config", str(path), "show", str(v_p)])
    assert f"# edgeloop-ptychonn v{v_p}" in capsys.readouterr().out
    out = tmp_path / "out"
    out.mkdir()
    main(["models", "--config", str(path), "export", str(v_p), "--out", str(out)])
    (archive,) = out.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        assert {m.name.split("/")[0] for m in tar.getmembers()} == {f"ptychonn-v{v_p:04d}"}
    main(["models", "--config", str(path), "verify", str(archive)])
    assert "ok" in capsys.readouterr().out
    folder = records.record_path(cfg.registry_path, "ptychonn", v_p)
    (folder / "model.onnx").write_bytes(b"changed")
    with pytest.raises(SystemExit) as exc:
        main(["models", "--config", str(path), "verify"])
    assert exc.value.code == 1
    assert "model.onnx: sha256" in capsys.readouterr().out


def test_bad_filters_are_refused_clearly(reg):
    _, path, *_ = reg
    with pytest.raises(SystemExit) as exc:
        main(["models", "--config", str(path), "list", "--where", "val_loss~1"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["models", "--config", str(path), "show", "99"])


def test_a_reference_error_goes_into_the_card_and_stays_through_a_rewrite(reg):
    cfg, _, registry, _, versions = reg
    v = versions["ptychonn"]
    folder = records.write_record(cfg, v, registry)
    assert json.loads((folder / "card.json").read_text())["metrics"]["reference_error"] is None
    measured = {"error": 0.041, "info": "ptycho: 0.041 rad on 30 frames", "time": time.time()}
    records.write_record(cfg, v, registry, measured)
    records.write_record(cfg, v, registry)  # e.g. `edgeloop models record`
    metrics = json.loads((folder / "card.json").read_text())["metrics"]
    assert metrics["reference_error"] == 0.041 and "30 frames" in metrics["reference_measured"]
    assert "0.041" in (folder / "README.md").read_text()
    gate_pub = records.approval.key_paths(cfg.security)[1].read_bytes()
    assert records.verify_record(folder, gate_pub).ok
    (row,) = records.listing(cfg, kind="ptychonn")
    assert row["reference_error"] == 0.041
