"""The edge serves only what the gate approved (issue 22, items 3 and 4): versions carry the
retraining service's Ed25519 signature over their number, bytes, kind, parent, request and
labels; an unsigned, re-signed, altered or moved version is refused with the reason, before
its file is read, and a restarted edge does not serve one."""

import json
import shutil

import pytest

from edgeloop import approval
from edgeloop.config import Config
from edgeloop.edge_pva.inference import ModelRejected
from edgeloop.edge_pva.model_loader import ModelLoader
from edgeloop.models import PtychoNN
from edgeloop.registry import NOT_NOW, Registry, model_to_bytes
from tests.kit.models import add_approved


@pytest.fixture
def setup(tmp_path):
    cfg = Config(registry_dir=str(tmp_path / "models"))
    cfg.security.signing_key_file = str(tmp_path / "keys" / "signing.key")
    reg = Registry(cfg.registry_path)
    arch = cfg.arch("ptychonn")
    blob = model_to_bytes("ptychonn", arch, PtychoNN(**arch))
    messages = []
    loader = ModelLoader(cfg, reg, lambda text, severity: messages.append((severity, text)), print)
    return cfg, reg, blob, loader


def test_the_pair_is_made_on_first_use_with_a_private_key_only_its_owner_reads(setup):
    cfg, *_ = setup
    private, public = approval.key_paths(cfg.security)
    assert not private.exists()
    key = approval.private_key(cfg.security)
    assert private.stat().st_mode & 0o777 == 0o600
    assert private.parent.stat().st_mode & 0o077 == 0
    assert approval.public_key(cfg.security).public_bytes_raw() == (
        key.public_key().public_bytes_raw()
    )
    private.chmod(0o640)
    with pytest.raises(approval.GateKeyMissing, match="group or others.*chmod 600"):
        approval.private_key(cfg.security)


def test_an_approved_version_serves_and_every_other_is_refused_with_the_reason(setup, tmp_path):
    cfg, reg, blob, loader = setup
    good = add_approved(reg, blob, {"kind": "ptychonn"}, cfg.security)
    loader.load_version(good)
    assert loader.slots["ptychonn"].get().version == good

    planted = reg.add(blob, {"kind": "ptychonn"})  # by anything that can write the registry
    with pytest.raises(ModelRejected, match="carries no approval of the quality gate"):
        loader.load_version(planted)

    other = Config()  # another gate's key pair: a version signed there does not verify here
    other.security.signing_key_file = str(tmp_path / "elsewhere" / "signing.key")
    resigned = add_approved(reg, blob, {"kind": "ptychonn"}, other.security)
    with pytest.raises(ModelRejected, match="does not verify .*another gate key"):
        loader.load_version(resigned)

    altered = add_approved(reg, blob, {"kind": "ptychonn"}, cfg.security)
    meta = reg.meta(altered)
    meta["approval"]["fields"]["parent"] = 1  # one signed field changed
    (reg.root / f"v{altered:04d}.json").write_text(json.dumps(meta))
    with pytest.raises(ModelRejected, match="does not verify"):
        loader.load_version(altered)

    # an approved version's files copied under a new number (a replay)
    moved = reg.versions()[-1] + 1
    for ext in ("pt", "json"):
        shutil.copy(reg.root / f"v{good:04d}.{ext}", reg.root / f"v{moved:04d}.{ext}")
    with pytest.raises(ModelRejected, match=f"v{moved}: the gate approved version {good}"):
        loader.load_version(moved)
    assert loader.slots["ptychonn"].get().version == good  # serving all along


def test_an_edge_without_the_public_key_loads_nothing_and_rejects_nothing(setup):
    cfg, reg, blob, loader = setup
    version = add_approved(reg, blob, {"kind": "ptychonn"}, cfg.security)
    _, public = approval.key_paths(cfg.security)
    public.unlink()
    with pytest.raises(ModelRejected, match=f"{NOT_NOW} .*no gate public key at {public}"):
        loader.load_version(version)
    assert reg.meta(version).get("status") is None


def test_a_restarted_edge_does_not_serve_a_version_planted_as_accepted(setup):
    cfg, reg, blob, _ = setup
    good = add_approved(reg, blob, {"kind": "ptychonn"}, cfg.security)
    reg.mark_accepted(good)
    planted = reg.add(blob, {"kind": "ptychonn"})
    reg.mark_accepted(planted)  # accepted.json names it now
    loader = ModelLoader(cfg, reg, lambda text, severity: None, print)
    assert loader.slots["ptychonn"].get().version == good
