"""What gets accepted (issue 22, items 5 to 8): a corrupt accepted.json is read from the
copy written with it, and refused when both are corrupt (never "nothing accepted"); a swap
whose record cannot be written does not serve; an edge that restarts never serves a rejected
version; running out of memory while a version is tried rejects nothing."""

import json
import logging

import pytest
import torch

from edgeloop.config import Config
from edgeloop.edge_pva.inference import ModelRejected, ServedModel
from edgeloop.edge_pva.model_loader import ModelLoader
from edgeloop.models import BraggNN, PtychoNN
from edgeloop.registry import (
    NOT_NOW,
    ModelUnavailable,
    Registry,
    RegistryCorrupt,
    model_to_bytes,
)
from tests.kit.models import add_approved


def config(root) -> Config:
    """The registry in ``root``, the gate's keys beside it (never in ~/.edgeloop)."""
    cfg = Config(registry_dir=str(root))
    cfg.security.signing_key_file = str(root.parent / f"{root.name}-keys" / "signing.key")
    return cfg


def registry_with_both_kinds(root) -> tuple[Registry, dict]:
    """ptychonn v1 then v2 accepted, braggnn v3 accepted, ptychonn v4 a candidate, each
    approved by the gate."""
    cfg = config(root)
    reg = Registry(root)
    ptycho = model_to_bytes("ptychonn", cfg.arch("ptychonn"), PtychoNN(**cfg.arch("ptychonn")))
    bragg = model_to_bytes("braggnn", cfg.arch("braggnn"), BraggNN(**cfg.arch("braggnn")))

    def add(blob, meta):
        return add_approved(reg, blob, meta, cfg.security)

    v = {
        "p1": add(ptycho, {"kind": "ptychonn", "val_loss": 0.3}),
        "p2": add(ptycho, {"kind": "ptychonn", "val_loss": 0.2}),
        "b3": add(bragg, {"kind": "braggnn", "val_loss": 0.1}),
        "p4": add(ptycho, {"kind": "ptychonn", "val_loss": 0.1}),
    }
    for name in ("p1", "p2", "b3"):
        reg.mark_accepted(v[name])
    return reg, v


def test_a_corrupt_accepted_json_is_read_from_its_copy_and_the_next_accept_keeps_both_kinds(
    tmp_path, caplog
):
    reg, v = registry_with_both_kinds(tmp_path)
    (tmp_path / "accepted.json").write_text('{"ptychonn": {"vers')  # torn by a disk fault
    caplog.set_level(logging.ERROR, logger="edgeloop.registry")
    assert reg.accepted("ptychonn") == v["p2"] and reg.accepted("braggnn") == v["b3"]
    assert reg.previous("ptychonn") == v["p1"]
    assert "accepted.json is unreadable" in caplog.text and "using its copy" in caplog.text
    assert caplog.text.count("using its copy") == 1  # once, not at every read
    reg.mark_accepted(v["p4"])
    record = json.loads((tmp_path / "accepted.json").read_text())
    assert record["braggnn"]["version"] == v["b3"]  # the other kind is not dropped
    assert record["ptychonn"]["history"] == [v["p1"], v["p2"], v["p4"]]
    assert (tmp_path / "accepted.copy.json").read_text() == (
        tmp_path / "accepted.json"
    ).read_text()


def test_with_both_copies_corrupt_nothing_is_assumed_and_nothing_written(tmp_path):
    reg, v = registry_with_both_kinds(tmp_path)
    (tmp_path / "accepted.json").write_text("[]")
    (tmp_path / "accepted.copy.json").write_text('{"braggnn": 3}')
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for read in (reg.accepted, reg.previous, reg.accepted_history):
        with pytest.raises(RegistryCorrupt, match="a list, not an object.*its entry 'braggnn'"):
            read("ptychonn")
    with pytest.raises(RegistryCorrupt, match="Restore one of them"):
        reg.mark_accepted(v["p4"])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # a registry never written to, by contrast, holds no accepted version
    assert Registry(tmp_path / "new").accepted("ptychonn") is None


def test_a_legacy_record_without_history_or_copy_still_names_what_serves(tmp_path):
    reg, v = registry_with_both_kinds(tmp_path)
    (tmp_path / "accepted.copy.json").unlink()
    (tmp_path / "accepted.json").write_text(json.dumps({"ptychonn": {"version": v["p2"]}}))
    assert reg.accepted("ptychonn") == v["p2"] and reg.accepted_history("ptychonn") == [v["p2"]]


def _loader(reg: Registry, messages: list) -> ModelLoader:
    cfg = config(reg.root)
    return ModelLoader(cfg, reg, lambda text, severity: messages.append((severity, text)), print)


def test_a_restarted_edge_never_serves_a_rejected_version(tmp_path):
    reg, v = registry_with_both_kinds(tmp_path)
    reg.mark_rejected(v["p2"], "NaN phase on the probe set")  # by another worker, say
    loader = _loader(reg, [])
    assert loader.slots["ptychonn"].get().version == v["p1"]  # the one accepted before it
    assert loader.slots["braggnn"].get().version == v["b3"]


def test_an_edge_does_not_start_on_an_unreadable_record(tmp_path):
    reg, _ = registry_with_both_kinds(tmp_path)
    for name in ("accepted.json", "accepted.copy.json"):
        (tmp_path / name).write_text("{trunc")
    with pytest.raises(RegistryCorrupt):
        _loader(reg, [])


def test_a_swap_whose_record_cannot_be_written_keeps_the_old_model_serving(tmp_path):
    reg, v = registry_with_both_kinds(tmp_path)
    messages = []
    loader = _loader(reg, messages)
    for name in ("accepted.json", "accepted.copy.json"):
        (tmp_path / name).write_text("{trunc")
    with pytest.raises(ModelRejected, match="recording it as accepted failed"):
        loader.load_version(v["p4"])
    assert loader.slots["ptychonn"].get().version == v["p2"]
    assert messages[-1][0] == 2 and f"v{v['p4']} not deployed" in messages[-1][1]
    assert reg.meta(v["p4"]).get("status") is None  # not the model's fault: not rejected
    for name in ("accepted.json", "accepted.copy.json"):
        (tmp_path / name).unlink()
    (tmp_path / "accepted.json").write_text(json.dumps({"ptychonn": {"version": v["p2"]}}))
    loader.load_version(v["p4"])  # once the record is repaired
    assert loader.slots["ptychonn"].get().version == v["p4"] == reg.accepted("ptychonn")


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory"),
    ],
    ids=["MemoryError", "CUDA", "CPU allocator"],
)
def test_out_of_memory_while_trying_a_version_rejects_nothing(tmp_path, monkeypatch, error):
    reg, v = registry_with_both_kinds(tmp_path)
    messages = []
    loader = _loader(reg, messages)
    infer, failures = ServedModel.infer, []

    def infer_once_out_of_memory(self, inputs):
        if not failures:
            failures.append(error)
            raise error
        return infer(self, inputs)

    monkeypatch.setattr(ServedModel, "infer", infer_once_out_of_memory)
    with pytest.raises(ModelRejected, match=f"v{v['p4']} {NOT_NOW}"):
        loader.load_version(v["p4"])
    assert reg.meta(v["p4"]).get("status") is None and messages[-1][0] == 2
    assert loader.slots["ptychonn"].get().version == v["p2"]
    loader.load_version(v["p4"])  # memory is back
    assert loader.slots["ptychonn"].get().version == v["p4"]


def test_a_model_file_that_cannot_be_read_for_memory_is_not_called_corrupt(tmp_path, monkeypatch):
    reg, v = registry_with_both_kinds(tmp_path)

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(torch, "load", no_memory)
    with pytest.raises(ModelUnavailable, match="could not be loaded now: MemoryError"):
        reg.load(v["p4"])
    loader_messages = []
    monkeypatch.undo()
    loader = _loader(reg, loader_messages)
    monkeypatch.setattr(torch, "load", no_memory)
    with pytest.raises(ModelRejected, match=NOT_NOW):
        loader.load_version(v["p4"])
    assert reg.meta(v["p4"]).get("status") is None
