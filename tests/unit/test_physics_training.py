"""Physics-informed training of PtychoNN (remote/physics.py): the forward model is the edge's,
its terms vanish at the truth and only there, a network learns phase from frames alone, and
a retraining with ``train.loss = "physics"`` starts before the labels exist."""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import h5py
import numpy as np
import pytest
import torch

from edgeloop import approval
from edgeloop.bluesky_plans.plans import spiral_positions
from edgeloop.config import Config, ConfigError, TrainConfig
from edgeloop.edge_pva.label_free import DataResidual
from edgeloop.ioc.physics import PtychoSimulator
from edgeloop.models import PtychoNN, ptycho_preprocess
from edgeloop.optics import centring_sign, illuminated_mask
from edgeloop.registry import Registry
from edgeloop.remote import tasks
from edgeloop.remote.executor_slot import ExecutorSlot
from edgeloop.remote.held_out import read_training_set
from edgeloop.remote.physics import (
    TrainingLoss,
    amplitude_error,
    far_field,
    overlap_error,
    partners,
)
from edgeloop.remote.pipeline import RetrainPipeline
from edgeloop.remote.training import evaluate, split, train
from edgeloop.signing import create_key
from tests.kit.progress import Recorder
from tests.unit.test_continual import ptycho_scan, request

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def sim():
    return PtychoSimulator(Config().sim)


def torch_far_field(probe, amplitude, phase):
    shifted = torch.from_numpy(probe * centring_sign(probe.shape[0]))
    return far_field(shifted, torch.from_numpy(amplitude), torch.from_numpy(phase)).numpy()


def test_the_forward_model_is_the_one_the_edge_checks_answers_with(sim):
    patch = sim.patch(0.1, -0.2)
    amplitude, phase = np.abs(patch)[None], np.angle(patch)[None]
    edge = DataResidual(sim.probe).predicted_moduli(amplitude, phase)
    ours = torch_far_field(sim.probe, amplitude, phase)
    np.testing.assert_allclose(ours, edge, rtol=1e-4, atol=1e-5 * edge.max())
    # and the simulator's frames are its square, up to the flux
    frame = sim.frame(0.1, -0.2, noise=False)
    ratio = frame / np.maximum(ours[0] ** 2, 1e-30)
    lit = frame > 1e-3 * frame.max()
    assert np.ptp(ratio[lit]) < 1e-3 * ratio[lit].mean()


def test_the_amplitude_error_vanishes_at_the_truth_and_ignores_the_flux(sim):
    patch = sim.patch(0.0, 0.0)
    amplitude, phase = np.abs(patch)[None], np.angle(patch)[None]
    measured = torch.from_numpy(np.sqrt(sim.frame(0.0, 0.0, noise=False)))[None]
    truth = torch.from_numpy(torch_far_field(sim.probe, amplitude, phase))
    assert amplitude_error(truth, measured).item() < 1e-3
    assert amplitude_error(truth, 37 * measured).item() < 1e-3  # normalised inputs
    wrong = phase + np.random.default_rng(0).normal(0, 0.2, phase.shape).astype(np.float32)
    off = torch.from_numpy(torch_far_field(sim.probe, amplitude, wrong))
    assert amplitude_error(off, measured).item() > 0.05


def test_the_overlap_of_two_points_ties_their_phases(sim):
    pixel = sim.cfg.pixel_um
    a = sim.true_phase(0.0, 0.0)
    b = sim.true_phase(-5 * pixel, 3 * pixel)  # (row, col) shift of b from a: (3, -5)
    lit = torch.from_numpy(illuminated_mask(sim.probe))
    pa, pb = torch.from_numpy(a)[None], torch.from_numpy(b)[None]
    shift = torch.tensor([[3.0, -5.0]])
    assert overlap_error(pa, pb, shift, lit).item() < 1e-3
    assert overlap_error(pa, pb + 0.3, shift, lit).item() == pytest.approx(0.3, rel=1e-3)
    assert overlap_error(pa, pb, torch.tensor([[-3.0, 5.0]]), lit).item() > 0.01
    far = torch.tensor([[80.0, 0.0]])  # no common pixel: no term
    assert overlap_error(pa, pb, far, lit).item() == 0


def test_each_frame_is_paired_with_its_nearest_neighbour_of_the_same_scan():
    positions = np.array([[0, 0], [0, 3], [0, 10], [0, 1], [50, 50]], float)
    scans = np.array([0, 0, 0, 1, 1])
    # frame 3 is nearest frame 0 but of another scan; frame 4 has no neighbour within 8 px
    assert partners(positions, scans, max_shift=8).tolist() == [1, 0, 1, 3, 4]


def test_training_on_frames_alone_explains_held_out_frames_better():
    """No labels: training under the physics loss lowers the amplitude error (the data
    residual the edge publishes) on frames it never saw, below the untrained network's and
    a flat object's. (Whether it also nears the true phase within a retraining's time is
    benchmarks/physics_training.py's question.) 32 px frames keep it to seconds."""
    sim = PtychoSimulator(replace(Config().sim, frame_size=32, probe_radius_px=6.0))
    pos = spiral_positions(96, 0.05, (0.0, 0.0))
    inputs = ptycho_preprocess([sim.frame(x, y) for x, y in pos], 32)
    pos_px = np.stack([pos[:, 1], pos[:, 0]], 1) / sim.cfg.pixel_um
    pair = partners(pos_px, np.zeros(len(pos)), 16)
    targets = (inputs[:, 0], np.round(pos_px[pair] - pos_px).astype(np.float32))
    loss = TrainingLoss("physics", sim.probe, pair)
    cfg = TrainConfig(epochs=20, batch_size=8, lr=3e-3, lr_min=3e-4, threads=1, val_fraction=0.2)
    _, held_out = split(len(inputs), cfg.val_fraction, cfg.seed)
    measured = torch.from_numpy(inputs[held_out, 0])

    def residual(amplitude, phase):
        return amplitude_error(far_field(loss.shifted_probe, amplitude, phase), measured)

    def network_residual(model):
        with torch.no_grad():
            pa, pp = model.eval()(torch.from_numpy(inputs[held_out]))
            return residual(pa[:, 0], pp[:, 0]).mean().item()

    flat = residual(torch.ones_like(measured), torch.zeros_like(measured)).mean().item()
    torch.manual_seed(0)
    model = PtychoNN(width=4)
    before = network_residual(model)
    model, objective, history = train(model, inputs, targets, loss, cfg)
    assert len(history) == 20 and objective == min(h["val_loss"] for h in history)
    assert objective == pytest.approx(evaluate(model, inputs, targets, loss, held_out))
    after = network_residual(model)
    assert after < 0.95 * min(before, flat), (before, flat, after)


def test_the_training_set_of_frames_and_of_labels_is_the_same_frames(tmp_path):
    scan = ptycho_scan(tmp_path / "scan_a.h5", (0.0, 0.0))
    req = request([scan], tmp_path / "labels.h5", tmp_path / "cache", epochs=2)
    frames = tasks.prepare_frames(dict(req, out=str(tmp_path / "frames.h5")))
    labels = tasks.analyze(req)
    assert frames["n_frames"] == labels["n_frames"] == 24
    with h5py.File(frames["frames"]) as f, h5py.File(labels["labels"]) as g:
        assert "phase" not in f and "phase" in g
        for key in ("inputs", "positions_px", "scan", "probe", "weight"):
            np.testing.assert_array_equal(f[key][()], g[key][()])
    physics = TrainConfig(loss="physics")
    inputs, targets, loss = read_training_set(
        frames["frames"], frames["sha256"], "ptychonn", physics
    )
    assert len(targets) == 2 and loss.partners is None  # no overlap term: no pairs
    overlap = replace(physics, overlap_weight=0.1)
    _, _, loss = read_training_set(frames["frames"], frames["sha256"], "ptychonn", overlap)
    assert (loss.partners != np.arange(24)).all()  # a spiral: each has a neighbour
    with pytest.raises(ValueError, match="lacks amplitude, phase"):
        read_training_set(
            frames["frames"], frames["sha256"], "ptychonn", replace(physics, loss="both")
        )
    with pytest.raises(ValueError, match="is PtychoNN's"):
        read_training_set(labels["labels"], labels["sha256"], "braggnn", physics)
    with pytest.raises(ConfigError, match="BraggNN trains on labels only"):
        Config.from_dict({"train_hedm": {"loss": "both"}})


class Recording(ThreadPoolExecutor):
    """A one-worker pool that notes the task of each submission."""

    def __init__(self):
        super().__init__(1)
        self.submitted = []

    def submit(self, fn, *args, **kwargs):
        self.submitted.append(fn.__name__)
        return super().submit(fn, *args, **kwargs)


def test_a_physics_retraining_trains_before_the_labels_and_is_gated_on_them(tmp_path):
    cfg = Config(data_dir=str(tmp_path / "data"), registry_dir=str(tmp_path / "m"))
    cfg.tiled.enabled = False
    cfg.security.signing_key_file = str(tmp_path / "signing.key")
    create_key(tmp_path / "signing.key")
    cfg.model.width = 4
    cfg.train = replace(cfg.train, loss="physics", epochs=2, recon_epochs=2, threads=1)
    (tmp_path / "data").mkdir()
    ptycho_scan(tmp_path / "data" / "scan_000001.h5", (0.0, 0.0))
    registry = Registry(cfg.registry_path)
    deployed = []

    def deploy(version):
        deployed.append(version)
        registry.mark_accepted(version)

    pool = Recording()
    slot = ExecutorSlot("threads", lambda name: Recording(), pool)
    pipe = RetrainPipeline(cfg, registry, slot, Recorder(), deploy)
    try:
        result = pipe.run("physics")
    finally:
        slot.shutdown()
    assert pool.submitted == ["prepare_frames", "train_model", "analyze"]
    assert pipe.progress.states == ["Staging", "Training", "Validating", "Deploying"]
    meta = registry.meta(result["version"])
    assert deployed == [1] and meta["train_settings"]["loss"] == "physics"
    # the gate measured the label loss on the labels made beside the training, and
    # signed what it judged on
    assert meta["val_loss"] > 0 and meta["executor_val_loss"] is None
    fields = approval.check(approval.public_key(cfg.security), meta, 1)
    assert fields["labels_sha256"] == meta["labels_sha256"]
    with h5py.File(fields["labels"]) as f:
        assert f["phase"].shape == (24, 64, 64)


def test_a_training_ends_at_its_time_budget_with_the_best_epoch_so_far():
    """``train.time_budget_s``: the run stops at the first batch past the budget (after that
    epoch's validation), by the clock it is given (here one that ticks once per call)."""
    ticks = iter(range(10**6))
    inputs = np.random.default_rng(0).random((40, 1, 16, 16), np.float32)
    targets = (inputs[:, 0], inputs[:, 0])
    loss = TrainingLoss("labels", np.ones((16, 16), np.complex64), None)
    cfg = TrainConfig(epochs=1000, batch_size=8, threads=1, time_budget_s=7)
    model, best, history = train(
        PtychoNN(width=2), inputs, targets, loss, cfg, clock=lambda: next(ticks)
    )
    # 4 batches an epoch, one tick each after the start's: the 8th batch is past 7 ticks
    assert len(history) == 2 and best == min(h["val_loss"] for h in history)
