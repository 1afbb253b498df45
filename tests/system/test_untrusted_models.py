"""Models are untrusted input (issue 11, item 3): bounded architectures checked before anything
is built, checksums, transient vs permanent file errors, registry files of any shape,
fallback from a corrupt best checkpoint, HMAC signatures on what an endpoint returns, the
quality gate computed by the service itself, and non-finite frames kept out of training."""

from concurrent.futures import Future
from pathlib import Path

import torch

from edgeloop import signing
from edgeloop.models import BraggNN
from edgeloop.registry import (
    Registry,
    model_to_bytes,
    sha256_bytes,
)
from edgeloop.remote import tasks


def test_missing_key_ends_in_error_naming_the_file(tmp_path):
    from tests.kit.loops import Loop

    lp = Loop(tmp_path / "loop")
    try:
        key = Path(lp.cfg.security.signing_key_file)
        key.unlink()
        lp.start_service("local")
        assert lp.retrain(timeout=30) == "Error"
        message = lp.value("ml:Message")
        assert str(key) in message and "not found" in message, message
        assert lp.ctx.get(f"{lp.p}ml:Status", timeout=5)["alarm.severity"] == 2
    finally:
        lp.close()


def test_lying_endpoint_cannot_deploy_a_worse_model(tmp_path):
    """Through the real loop: a first model is trained and serves; then the endpoint returns
    random weights, correctly signed, reporting a held-out loss of 0: rejected by the
    service's own figures, both figures recorded, the good model still serving."""
    from tests.kit.loops import Loop, hedm_scan

    lp = Loop(tmp_path / "loop")
    try:
        hedm_scan(lp.cfg.data_path, 12)
        lp.cfg.train_hedm.epochs = 20
        lp.start_service("local")
        assert lp.retrain() == "Idle", lp.value("ml:Message")
        v1 = lp.value("edge:ModelVersion")
        key = signing.load_key(lp.cfg.security.signing_key_file)

        class Lying:
            def __init__(self, inner):
                self.inner = inner

            def submit(self, fn, *args):
                future = self.inner.submit(fn, *args)
                if fn is not tasks.train_model:
                    return future
                out = Future()

                def lie(f):
                    r = f.result()
                    torch.manual_seed(3)
                    blob = model_to_bytes("braggnn", r["arch"], BraggNN(**r["arch"]))
                    r = dict(r, model=blob, sha256=sha256_bytes(blob), val_loss=0.0)
                    r["signature"] = signing.sign(key, blob, r)
                    out.set_result(r)

                future.add_done_callback(lie)
                return out

            def shutdown(self, wait=True, cancel_futures=False):
                self.inner.shutdown(wait=wait, cancel_futures=cancel_futures)

        lp.service.executor = Lying(lp.service.executor)
        assert lp.retrain() == "Error"
        message = lp.value("ml:Message")
        assert "quality gate" in message and "executor reported 0" in message, message
        reg = Registry(lp.cfg.registry_path)
        rejected = max(reg.versions())
        meta = reg.meta(rejected)
        assert meta["status"] == "rejected" and meta["executor_val_loss"] == 0.0
        assert meta["val_loss"] > meta["baseline_val_loss"] and meta["baseline"] == v1
        assert lp.value("edge:ModelVersion") == v1
        lp.service.executor = lp.service.executor.inner
    finally:
        lp.close()
