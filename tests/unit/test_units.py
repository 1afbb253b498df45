"""Unit tests: simulator, networks, preprocessing, stitching, registry, queue, NTNDArray."""

import json

import numpy as np
import pytest
import torch

from edgeloop import ntnd
from edgeloop.config import Config, ConfigError, SimConfig
from edgeloop.edge_pva.frame_queue import FrameQueue
from edgeloop.edge_pva.inference import (
    ModelRejected,
    ServedModel,
    TorchBackend,
    probe_inputs,
    validate,
)
from edgeloop.edge_pva.stitch import PhaseMap
from edgeloop.ioc.physics import PtychoSimulator
from edgeloop.models import (
    BraggNN,
    PtychoNN,
    count_parameters,
    kind,
    ptycho_preprocess,
    to_input_size,
)
from edgeloop.optics import extract_patch, illuminated_mask, make_probe
from edgeloop.registry import ModelFileError, Registry, model_to_bytes

SMALL = SimConfig(object_size=192, seed=3)


@pytest.fixture(scope="module")
def sim():
    return PtychoSimulator(SMALL)


def test_diffraction_is_far_field_of_probe_times_object(sim):
    frame = sim.frame(0.0, 0.0, noise=False)
    assert frame.shape == (64, 64)
    assert frame.sum() == pytest.approx(SMALL.photons, rel=1e-4)
    # Parseval: the exit wave's power equals the far field's
    wave = sim.probe * sim.patch(0.0, 0.0)
    expected = np.abs(np.fft.fftshift(np.fft.fft2(wave, norm="ortho"))) ** 2
    np.testing.assert_allclose(frame / frame.sum(), expected / expected.sum(), atol=1e-6)
    noisy = sim.frame(0.0, 0.0)
    assert noisy.dtype == np.int32 and abs(noisy.sum() - SMALL.photons) < 5 * np.sqrt(
        SMALL.photons
    )
    # a pure phase object's intensity changes with position (it is not blank)
    assert not np.allclose(frame, sim.frame(0.2, 0.1, noise=False))


def test_object_phase_range_and_out_of_range_stage(sim):
    phase = np.angle(sim.obj)
    assert phase.min() >= -1e-6 and phase.max() <= SMALL.max_phase + 1e-6
    assert phase.std() > 0.1
    with pytest.raises(ValueError, match="leaves"):
        sim.patch(10.0, 0.0)


def test_subpixel_patch_matches_integer_shift():
    obj = np.exp(1j * np.random.default_rng(0).random((80, 80))).astype(np.complex64)
    a = extract_patch(obj, 10.0, 12.0, 32)
    np.testing.assert_array_equal(a, obj[10:42, 12:44])
    b = extract_patch(obj, 10.5, 12.0, 32)
    assert not np.allclose(a, b)
    assert np.abs(b).mean() == pytest.approx(1.0, abs=0.1)


def test_probe_and_mask():
    probe = make_probe(64, 12, 10)
    assert probe.shape == (64, 64) and np.sum(np.abs(probe) ** 2) == pytest.approx(1, rel=1e-5)
    assert 300 < illuminated_mask(probe).sum() < 2000


@pytest.mark.parametrize("width", [8, 32])
def test_ptychonn_shapes_and_ranges(width):
    model = PtychoNN(width).eval()
    with torch.no_grad():
        amp, phase = model(torch.rand(3, 1, 64, 64))
    assert amp.shape == phase.shape == (3, 1, 64, 64)
    assert amp.min() >= 0 and amp.max() <= 1 and phase.abs().max() <= np.pi
    if width == 32:  # the published size
        assert 1.0e6 < count_parameters(model) < 1.3e6


def test_preprocess_bins_large_frames_and_pads_small():
    big = np.ones((512, 512), np.int32)
    assert to_input_size(big, 64).shape == (64, 64)
    assert to_input_size(big, 64)[0, 0] == 64  # 8x8 sum-binning keeps photon counts
    small = np.ones((40, 40), np.float32)
    padded = to_input_size(small, 64)
    assert padded.shape == (64, 64) and padded.sum() == 1600
    x = ptycho_preprocess([big, small], 64)
    assert x.shape == (2, 1, 64, 64)
    np.testing.assert_allclose(x.mean(axis=(1, 2, 3)), 0.25, rtol=1e-5)


def test_phase_map_stitches_patches_at_positions():
    truth = np.random.default_rng(1).random((128, 128)).astype(np.float32)
    pm = PhaseMap(128, 32, 0.01)
    for x, y in [(0, 0), (0.05, 0), (0, 0.05), (-0.1, -0.1)]:
        r, c = 48 + int(round(y / 0.01)), 48 + int(round(x / 0.01))
        assert pm.add(truth[r : r + 32, c : c + 32], x, y)
    img = pm.image()
    seen = img != 0
    np.testing.assert_allclose(img[seen], truth[seen], atol=1e-5)
    assert not pm.add(np.zeros((32, 32), np.float32), 5.0, 0)  # off the map
    assert pm.outside == 1 and pm.count == 4
    with pytest.raises(ValueError):
        pm.add(np.zeros((16, 16), np.float32), 0, 0)
    pm.reset()
    assert pm.count == 0 and not pm.image().any()


def test_frame_queue_drops_oldest_and_counts():
    q = FrameQueue(3)
    for i in range(5):
        q.put(i)
    assert q.dropped == 2
    assert q.get_batch(10, timeout=0.01) == [2, 3, 4]
    assert q.get_batch(10, timeout=0.01) == []
    with pytest.raises(ValueError):
        FrameQueue(0)


def test_frame_queue_is_bounded_in_bytes_as_well_as_in_frames():
    q = FrameQueue(256, max_bytes=100)
    for uid, size in enumerate((40, 40, 40, 90, 10)):
        q.put(uid, size)
    # 40+40+40 > 100 dropped uid 0; 90 left room for nothing else; 90+10 fits
    assert q.dropped == 3 and q.queued_bytes == 100
    assert q.get_batch(10, timeout=0.01) == [3, 4]
    assert q.queued_bytes == 0
    c = q.counts()
    assert c["in"] == 5 and c["dropped"] == 3 and c["in_flight"] == 2
    q.put("alone", 500)  # one frame above the bound still queues (max_frame_bytes refuses it)
    assert q.get_batch(10, timeout=0.01) == ["alone"]


def test_ntndarray_round_trip_and_bad_frames():
    data = np.arange(12, dtype=np.int32).reshape(3, 4)
    frame = ntnd.decode(ntnd.build(data, 7, {"SampleX": 0.25}))
    np.testing.assert_array_equal(frame.data, data)
    assert frame.unique_id == 7 and frame.attributes["SampleX"] == 0.25
    bad = ntnd.build(data, 1)
    bad["dimension"] = [{"size": 5}, {"size": 3}]
    with pytest.raises(ntnd.FrameError, match="does not match"):
        ntnd.decode(bad)
    coded = ntnd.build(data, 1)
    coded["codec.name"] = "lz4"
    with pytest.raises(ntnd.FrameError, match="lz4"):
        ntnd.decode(coded)
    with pytest.raises(ntnd.FrameError):
        ntnd.build(np.zeros((2, 2, 2)), 1)


def test_registry_versions_checksums_and_best(tmp_path):
    reg = Registry(tmp_path)
    assert reg.versions() == [] and reg.accepted("ptychonn") is None
    assert reg.best("ptychonn") is None
    blob = model_to_bytes("ptychonn", {"width": 4}, PtychoNN(4))
    v1 = reg.add(blob, {"kind": "ptychonn", "val_loss": 0.5})
    v2 = reg.add(blob, {"kind": "ptychonn", "val_loss": 0.3})
    assert (v1, v2) == (1, 2)
    model, meta = reg.load(v2)
    assert meta["val_loss"] == 0.3 and isinstance(model, PtychoNN)
    reg.mark_accepted(v1)
    assert reg.best("ptychonn") == v1  # v2 is not accepted yet
    reg.mark_accepted(v2)
    assert reg.accepted("ptychonn") == v2 and reg.best("ptychonn") == v2
    # kinds share version numbers but are accepted independently
    vb = reg.add(
        model_to_bytes("braggnn", {"patch": 11}, BraggNN(11)),
        {"kind": "braggnn", "val_loss": 0.01},
    )
    reg.mark_accepted(vb)
    assert vb == 3 and reg.accepted("braggnn") == vb and reg.accepted("ptychonn") == v2
    assert reg.best("ptychonn") == v2 and reg.best("braggnn") == vb
    reg.mark_rejected(v1, "test")
    assert json.loads((tmp_path / "v0001.json").read_text())["status"] == "rejected"
    # a corrupted file fails its checksum; garbage with a matching checksum fails to load
    (tmp_path / "v0002.pt").write_bytes(b"garbage")
    with pytest.raises(ModelFileError, match="checksum"):
        reg.load(v2)
    v3 = reg.add(b"not a torch file", {"kind": "ptychonn", "val_loss": 0.1})
    with pytest.raises(ModelFileError, match="does not load"):
        reg.load(v3)


def test_validate_rejects_models_with_wrong_outputs():
    spec = kind("ptychonn")
    frames = [np.random.default_rng(0).poisson(5, (64, 64)) for _ in range(2)]
    validate(ServedModel(1, spec, 64, TorchBackend(PtychoNN(4))), frames)

    class NaNNet(PtychoNN):
        def forward(self, x):
            a, p = super().forward(x)
            return a, p * float("nan")

    with pytest.raises(ModelRejected, match="NaN"):
        validate(ServedModel(2, spec, 64, TorchBackend(NaNNet(4))), frames)

    class CroppedNet(PtychoNN):
        def forward(self, x):
            a, p = super().forward(x)
            return a[..., :16], p[..., :16]

    with pytest.raises(ModelRejected, match="shape"):
        validate(ServedModel(3, spec, 64, TorchBackend(CroppedNet(4))), frames)


def test_validate_braggnn_on_made_up_patches():
    spec = kind("braggnn")
    patches = probe_inputs("braggnn", 11, [])
    assert len(patches) == 3 and patches[0].shape == (11, 11)
    validate(ServedModel(1, spec, 11, TorchBackend(BraggNN(11))), patches)

    class FarAway(BraggNN):
        def forward(self, x):
            return (super().forward(x)[0] + 5.0,)

    with pytest.raises(ModelRejected, match="outside the patch"):
        validate(ServedModel(2, spec, 11, TorchBackend(FarAway(11))), patches)
    with pytest.raises(ModelRejected, match="2 outputs"):  # a PtychoNN is no BraggNN
        validate(ServedModel(3, spec, 11, TorchBackend(PtychoNN(4))), patches)


def test_config_round_trip_and_unknown_keys(tmp_path):
    cfg = Config()
    cfg.train.epochs = 3
    cfg.dump(tmp_path / "c.json")
    assert Config.load(tmp_path / "c.json").train.epochs == 3
    with pytest.raises(ConfigError, match="unknown configuration key 'nonsense'"):
        Config.from_dict({"nonsense": 1})
    with pytest.raises(ConfigError, match="unknown configuration key 'train.epoch'"):
        Config.from_dict({"train": {"epoch": 3}})


def test_a_renamed_key_is_read_under_its_old_name_with_a_warning(caplog):
    old = {"security": {"endpoint_signing_key_file": "/keys/signing.key"}}
    with caplog.at_level("WARNING", logger="edgeloop.config"):
        cfg = Config.from_dict(old)
    assert cfg.security.executor_signing_key_file == "/keys/signing.key"
    assert "security.endpoint_signing_key_file is now security.executor_signing_key_file" in (
        caplog.text
    )
    assert old == {"security": {"endpoint_signing_key_file": "/keys/signing.key"}}  # untouched
    new = {"security": {"executor_signing_key_file": "/new.key", "endpoint_signing_key_file": "x"}}
    assert Config.from_dict(new).security.executor_signing_key_file == "/new.key"


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"edge": {"max_batch": 0}},
            r"edge\.max_batch: Input should be greater than or equal to 1",
        ),
        ({"edge": {"queue_size": "many"}}, r"edge\.queue_size: Input should be a valid integer"),
        ({"mode": "xrd"}, r"mode: Input should be 'ptycho' or 'hedm'"),
        ({"train": {"val_fraction": 1.5}}, r"train\.val_fraction: Input should be less than 1"),
        (
            {"train": {"schedule": "step"}},
            r"train\.schedule: Input should be 'cyclic' or 'cosine'",
        ),
        ({"train": {"lr_min": 1.0}}, r"train: .*lr_min 1\.0 above lr 0\.001"),
        (
            {"hedm": {"fwhm_range": [3, 1]}},
            r"hedm: .*fwhm_range: low end 3\.0 above high end 1\.0",
        ),
        ({"remote": {"staging": "ftp"}}, r"remote\.staging: Input should be 'shared' or 'globus'"),
    ],
)
def test_config_values_are_checked_by_type_and_range(data, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict(data)


def test_config_keeps_section_defaults_and_checks_assignments():
    cfg = Config.from_dict({"train_hedm": {"epochs": 5}, "hedm": {"fwhm_range": [1, 2]}})
    assert cfg.train_hedm.epochs == 5
    assert cfg.train_hedm.schedule == "cosine"  # train_hedm's own default, not train's
    assert cfg.hedm.fwhm_range == (1.0, 2.0)
    with pytest.raises(ValueError, match="max_batch"):
        cfg.edge.max_batch = 0
    assert cfg.edge.max_batch == 16


def test_local_executor_stops_a_running_task_on_shutdown():
    """A stopped retraining service must not leave its worker training as an orphan."""
    import time

    from edgeloop.remote.executors import LocalExecutor

    ex = LocalExecutor()
    future = ex.submit(time.sleep, 60)
    deadline = time.monotonic() + 30
    while not future.running():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    from tests.kit.waiting import wait_process_gone

    (worker,) = ex._processes.values()
    ex.shutdown(wait=False, cancel_futures=True)
    # the executor's own thread may reap the worker first, so look at the pid, not join()
    assert wait_process_gone(worker.pid, 10)


@pytest.mark.parametrize(
    "name, size, arch", [("braggnn", 11, {"patch": 11}), ("ptychonn", 64, {"width": 4})]
)
def test_onnxruntime_backend_matches_torch(name, size, arch):
    from edgeloop.edge_pva.inference import make_backend

    torch.manual_seed(0)
    model = kind(name).build(**arch).eval()
    batch = np.random.default_rng(0).random((5, 1, size, size)).astype(np.float32)
    ref = make_backend("torch", model, size)(batch)
    got = make_backend("onnxruntime", model, size)(batch)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="unknown inference backend"):
        make_backend("tensorrt-on-cpu", model, size)


def test_config_logging_owns_the_edgeloop_logger_and_leaves_root_alone():
    import io
    import logging

    from edgeloop.log import LIBRARY_LOGGERS, config_logging, verbosity_level

    assert [verbosity_level(v, q) for v, q in ((0, 0), (1, 0), (2, 0), (0, 1), (0, 2))] == [
        logging.INFO,
        logging.DEBUG,
        logging.DEBUG,
        logging.WARNING,
        logging.ERROR,
    ]
    root = logging.getLogger()
    root_state = (list(root.handlers), root.level)
    saved = {
        name: (list(lg.handlers), lg.level, lg.propagate)
        for name in ("edgeloop", *LIBRARY_LOGGERS)
        for lg in [logging.getLogger(name)]
    }
    try:
        stream = io.StringIO()
        config_logging(logging.INFO, stream=io.StringIO())
        config_logging(logging.DEBUG, stream=stream)  # replaces the first handler
        logging.getLogger("edgeloop.edge_pva.server").debug("from a part")
        logging.getLogger("caproto.ctx").debug("from a library")
        assert "DEBUG edgeloop.edge_pva.server: from a part" in stream.getvalue()
        assert "from a library" not in stream.getvalue()  # only with libraries=True (-vv)
        ours = [h for h in logging.getLogger("edgeloop").handlers if h.get_name() == "edgeloop"]
        assert len(ours) == 1
        config_logging(logging.DEBUG, stream=stream, libraries=True)
        logging.getLogger("caproto.ctx").debug("from a library")
        assert "from a library" in stream.getvalue()
        assert (list(root.handlers), root.level) == root_state
    finally:
        for name, (handlers, level, propagate) in saved.items():
            lg = logging.getLogger(name)
            lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate


def test_fly_figures_count_answers_and_time_them_within_each_scan():
    from edgeloop.app.loop import fly_figures, fly_line

    # two scans of 3 frames at 100 Hz, 60 s apart; one frame of the second never answered
    first = [(t, t + 0.010) for t in (0.0, 0.01, 0.02)]
    second = [(t, t + 0.030) for t in (60.0, 60.01)]
    fly = fly_figures(6, [first, second], 100.0)
    assert (fly["frames_answered"], fly["frames_unanswered"]) == (5, 1)
    assert fly["exposure_to_answer_ms_p50"] == pytest.approx(10.0)
    assert fly["exposure_to_answer_ms_p99"] == pytest.approx(30.0, rel=0.05)
    assert fly["answers_per_s"] == pytest.approx(100.0)  # the 60 s between scans left out
    assert "6 frames offered, 5 answered, 1 not" in fly_line(fly)
    none = fly_figures(4, [[]], 50.0)
    assert none["frames_answered"] == 0 and none["answers_per_s"] is None
    assert "0 answered, 4 not" in fly_line(none)
