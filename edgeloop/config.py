"""Configuration (core), shared by every part: one dataclass per section, embedded defaults,
JSON overrides, each value validated (pydantic) by type and range."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import field
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass

# Two CA servers on one host cannot share UDP port 5064 for unicast searches (the kernel
# hands each datagram to one socket), so the simulated beamline serves CA on its own port
# and clients search both; the real ML IOC keeps the standard 5064.  A second simulated
# system on the same host sets EDGELOOP_BEAMLINE_CA_PORT to another port.
BEAMLINE_CA_PORT = int(os.environ.get("EDGELOOP_BEAMLINE_CA_PORT", "5066"))
# the embedded Tiled server's default port ([tiled] port); EDGELOOP_TILED_PORT moves it
TILED_PORT = int(os.environ.get("EDGELOOP_TILED_PORT", "8437"))

LOOPBACK_ENV = {
    "EPICS_CA_ADDR_LIST": f"127.0.0.1 127.0.0.1:{BEAMLINE_CA_PORT}",
    "EPICS_CA_AUTO_ADDR_LIST": "NO",
    "EPICS_PVA_ADDR_LIST": "127.0.0.1",
    "EPICS_PVA_AUTO_ADDR_LIST": "NO",
    "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
}


def pin_loopback(environ: dict | os._Environ = os.environ, force: bool = False) -> None:
    """Keep all EPICS traffic on loopback: unless the caller set the variables already, or
    whatever they hold with ``force`` (the demo, which starts every server itself)."""
    for key, value in LOOPBACK_ENV.items():
        if force:
            environ[key] = value
        else:
            environ.setdefault(key, value)


def search_hint(protocol: str = "pva", environ: dict | os._Environ = os.environ) -> str:
    """Where a ``pva`` or ``ca`` client searches for PVs, as the EPICS environment says; for
    the message about a PV that does not answer."""
    key = {"pva": "EPICS_PVA", "ca": "EPICS_CA"}[protocol]
    addresses = environ.get(f"{key}_ADDR_LIST", "")
    auto = environ.get(f"{key}_AUTO_ADDR_LIST", "YES")
    return f"searched {key}_ADDR_LIST={addresses!r}, {key}_AUTO_ADDR_LIST={auto}"


# Every section refuses unknown keys and checks each value's type and range, on load and on
# assignment; a bad value is named by its key (ConfigError).
SECTION = ConfigDict(extra="forbid", validate_assignment=True)
# keys renamed since a release, read under their old name with a warning: (section, old): new
RENAMED = {("security", "endpoint_signing_key_file"): "executor_signing_key_file"}

log = logging.getLogger(__name__)

Count = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Seconds = Annotated[float, Field(gt=0)]
# an NDAttribute's name as an attributes file gives it (and HDF5 a dataset's)
AttributeName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.:-]{0,63}$")]


def _ordered(section, *names: str) -> None:
    for name in names:
        lo, hi = getattr(section, name)
        if lo > hi:
            raise ValueError(f"{name}: low end {lo} above high end {hi}")


@dataclass(config=SECTION)
class SimConfig:
    """The simulated ptychography experiment (ioc/physics.py)."""

    # object pixels per side; stage (0, 0) is the centre
    object_size: Annotated[int, Field(ge=16)] = 640
    pixel_um: Positive = 0.01  # object pixel size (10 nm)
    frame_size: Annotated[int, Field(ge=8)] = 64  # detector pixels per side
    probe_radius_px: Positive = 12.0  # aperture radius in detector pixels (sets probe width)
    probe_defocus: float = 10.0  # quadratic phase of the probe pupil, radians at the edge
    photons: Positive = 1.0e6  # photons per frame
    max_phase: NonNegative = 1.0  # phase of the thickest feature, radians
    feature_blur_px: NonNegative = 3.0  # edge softness of the test pattern (Gaussian sigma)
    absorption: NonNegative = 0.1  # amplitude = exp(-absorption * phase)
    seed: Seed = 7


@dataclass(config=SECTION)
class HedmConfig:
    """The simulated HEDM experiment (ioc/hedm_sim.py)."""

    frame_size: Annotated[int, Field(ge=16)] = 512  # detector pixels per side
    n_grains: Annotated[int, Field(ge=0)] = 12
    # reflections each grain gives over a full turn; 12 x 60 = 720 puts ~20 lit peaks in a
    # frame (a reflection is lit over ~+-3 sigma of omega, about 9 deg of 360)
    reflections_per_grain: Annotated[int, Field(ge=0)] = 60
    n_rings: Count = 5  # Debye-Scherrer rings (fcc spacing)
    # ring radii, fraction of frame_size
    ring_radius_range: tuple[Positive, Annotated[float, Field(gt=0, le=0.5)]] = (0.15, 0.45)
    omega_width_deg: Positive = 1.5  # sigma of a reflection's intensity in omega
    azimuth_drift_rad: float = 0.3  # azimuth = az0 + drift * sin(omega - omega_peak)
    fwhm_range: tuple[Positive, Positive] = (1.2, 3.0)  # pixels
    eta_range: tuple[Fraction, Fraction] = (0.0, 0.8)  # Lorentzian fraction
    # +x side FWHM is fwhm_x * (1 + asym), |asym| <= asym_max
    asym_max: Annotated[float, Field(ge=0, lt=1)] = 0.15
    intensity_range: tuple[Positive, Positive] = (300.0, 5000.0)  # counts at peak
    background: NonNegative = 20.0  # mean counts per pixel (Poisson)
    # uint16 detector: clipped here and flagged
    saturation: Annotated[int, Field(ge=1, le=65535)] = 65535
    min_height: NonNegative = 10.0  # a reflection is lit (rendered, in truth) above this
    render_tol: Positive = 0.5  # counts: a peak's box extends until its tail falls below this
    overlap_fraction: Fraction = 0.15  # reflections placed a few pixels from a partner
    seed: Seed = 11

    def __post_init__(self):
        _ordered(self, "ring_radius_range", "fwhm_range", "eta_range", "intensity_range")


# The technique decides the network: the detector's Mode, the scan files' technique and the
# model kind the edge serves and remote/ trains all follow from it.
Mode = Literal["ptycho", "hedm"]
MODES = get_args(Mode)
MODE_KIND = {"ptycho": "ptychonn", "hedm": "braggnn"}
MODE_TECHNIQUE = {"ptycho": "ptychography", "hedm": "hedm"}
# technique -> (the key of its positions in a scan, as scanfile.read_scan returns it; axes)
SCAN_POSITIONS = {"ptychography": ("positions_um", 2), "hedm": ("omega_deg", 1)}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {list(MODES)}")
    return mode


Backend = Literal["auto", "torch", "onnxruntime", "torch-cuda", "tensorrt"]
Precision = Literal["auto", "fp16", "fp32"]


@dataclass(config=SECTION)
class ModelConfig:
    """The networks served at the edge and trained by remote/."""

    # PtychoNN: frames are brought to this size before inference
    input_size: Annotated[int, Field(ge=8)] = 64
    width: Count = 8  # channels of the first encoder block (published PtychoNN: 32, 1.15 M
    # parameters); 8 keeps CPU training of the demo within minutes
    # PtychoNN's decoders: "plain" (published) or "skip" (U-Net skip connections: the
    # encoder's features joined at each scale; same widths). "skip" with train.loss "both"
    # gave the stitched map nearest ptychi's at equal training time
    # (docs/explanations/training.md)
    decoder: Literal["plain", "skip"] = "skip"
    patch: Annotated[int, Field(ge=3)] = 11  # BraggNN: patch side cropped around each peak
    # BraggNN's first conv channels: the published 64 is 35x faster per peak than the fit on
    # one core, 16 (trained 60+ epochs) 131x at the same error (edgeloop hedm-accuracy)
    braggnn_width: Count = 16


@dataclass(config=SECTION)
class EdgeConfig:
    queue_size: Count = 256
    max_batch: Count = 16
    # inference backend (edge_pva/inference.py BACKENDS; docs/howto/backends.md): torch
    # and onnxruntime run on the CPU; torch-cuda and tensorrt need an NVIDIA GPU; auto:
    # onnxruntime where installed, else torch
    backend: Backend = "torch"
    # torch-cuda / tensorrt arithmetic; "auto": each model kind's (PtychoNN fp16, BraggNN
    # fp32); the CPU backends always compute in fp32
    precision: Precision = "auto"
    # tensorrt: built engines (and their ONNX graphs), one per model version and GPU;
    # "": <registry_dir>/engines
    engine_cache: str = ""
    threads: Count = 1
    # phase-map canvas, object pixels; same geometry as SimConfig
    map_size: Annotated[int, Field(ge=16)] = 640
    map_publish_s: Seconds = 0.5
    stitch_sigma_px: Positive = 6.0  # Gaussian weight of each patch in the map (~ probe size)
    stats_publish_s: Seconds = 0.5
    peak_sigma: Positive = 8.0  # HEDM: a peak pixel exceeds background + sigma * noise
    peak_min_separation: Count = 3  # HEDM: pixels between two maxima kept as two peaks
    latency_warn_ms: Positive = 100.0  # edge:LatencyMs above: MINOR
    latency_alarm_ms: Positive = 1000.0  # above: MAJOR
    dropped_rate_alarm: Positive = 10.0  # edge:DroppedRate (frames/s) above: MAJOR; any: MINOR
    # edge:Consistency / edge:ScanConsistency, the label-free quality of each frame's answer
    # and its mean over the scan (edge_pva/label_free.py; benchmarks/consistency.py,
    # hedm_consistency.py), above: MINOR / MAJOR.  Ptychography (rad): the overlap
    # disagreement and the forward-model residual in quadrature; measured on the simulated
    # scan: a well-trained PtychoNN ~0.065, an untrained (flat) one ~0.093
    consistency_warn_rad: Positive = 0.07
    consistency_alarm_rad: Positive = 0.09
    # the illumination the residual puts predictions through: a .npy file of a complex
    # (frame_size, frame_size) probe (e.g. from a reconstruction); "": sim's nominal optics
    # (probe_radius_px, probe_defocus)
    probe_file: str = ""
    # HEDM (px): distance of BraggNN's centres from the patches' centroids; measured: a
    # BraggNN trained on fit labels ~0.24, after 1 epoch ~1.0, untrained ~7
    consistency_warn_px: Positive = 0.4
    consistency_alarm_px: Positive = 1.0
    # a frame holding more bytes (compressed or not) is refused before it is decoded
    max_frame_bytes: Count = 64 * 1024 * 1024
    # the frames queued for inference hold at most this many bytes together (and at most
    # queue_size frames): the oldest is dropped first, as when the queue is full
    max_queue_bytes: Count = 1024 * 1024 * 1024
    # HEDM: at most this many peaks are refined per frame; a frame with more is flagged
    max_peaks_per_frame: Count = 2000
    bad_frame_report_s: Seconds = 1.0  # one summary of refused frames per interval
    # edge --workers N: how long each worker may take to load a model before the version is
    # withdrawn from all of them (and deployed again later)
    worker_load_timeout_s: Seconds = 120.0

    @model_validator(mode="after")
    def _queue_holds_a_frame(self):
        if self.max_queue_bytes < self.max_frame_bytes:
            raise ValueError(
                f"max_queue_bytes {self.max_queue_bytes} is below max_frame_bytes "
                f"{self.max_frame_bytes}: the queue could not hold one frame"
            )
        return self


@dataclass(config=SECTION)
class TrainConfig:
    epochs: Count = 40
    batch_size: Count = 16
    lr: Positive = 1e-3
    lr_min: Positive = 1e-4
    # "cyclic": triangular2 between lr_min and lr (PtychoNN's schedule); "cosine": anneal
    # from lr to lr_min over the whole run (BraggNN: the annealed tail gives the last
    # hundredths of a pixel)
    schedule: Literal["cyclic", "cosine"] = "cyclic"
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    recon_epochs: Count = 30  # iterative phase retrieval epochs (labels)
    recon_algorithm: str = "LSQML"
    max_frames: Count = 4000  # newest frames kept for training (the continual buffer's cap)
    # continuing from a checkpoint: at most this many samples seen per retraining (epochs
    # shrink as the buffer grows, never below 3); 0: always ``epochs``
    sample_budget: Annotated[int, Field(ge=0)] = 0
    seed: Seed = 0
    threads: Count = 2
    # stop a training this many seconds after it starts (the best epoch so far is kept);
    # 0: no limit
    time_budget_s: NonNegative = 0.0
    # PtychoNN's loss (remote/physics.py; ``train`` defaults to "both", ``train_hedm``
    # trains on labels only): "labels" (against phase retrieval's labels),
    # "physics" (the predicted object through the probe and the far-field model against
    # the measured frame; trains before the labels exist), "both" (labels +
    # physics_weight x physics)
    loss: Literal["labels", "physics", "both"] = "labels"
    physics_weight: NonNegative = 1.0
    # neighbouring points' predicted phases must agree where both are lit (a term of the
    # physics loss): ties the frames' phase offsets together, but slowed learning where
    # measured (docs/explanations/training.md), so off by default
    overlap_weight: NonNegative = 0.0
    keep_initial: bool = False  # set when training from a checkpoint (remote/tasks.py)

    def __post_init__(self):
        if self.lr_min > self.lr:
            raise ValueError(f"lr_min {self.lr_min} above lr {self.lr}")


@dataclass(config=SECTION)
class RemoteConfig:
    """Where retraining runs (remote/executors.py) and how its data get there."""

    parsl_config_file: str = ""  # Python file defining `config` (Slurm, PBS, ...); "":
    # one HighThroughputExecutor with a LocalProvider on this machine
    parsl_workers: Count = 1
    parsl_worker_init: str = ""  # shell run before a worker starts (e.g. activate a venv)
    globus_endpoint_id: str = ""  # Globus Compute endpoint UUID
    task_timeout_s: Seconds = 1800.0  # a step running longer is abandoned -> Error
    # a new model may be at most 5 % worse (held-out loss); a negative margin demands that
    # much improvement
    quality_margin: Annotated[float, Field(gt=-1)] = 0.05
    # shared (same filesystem) or globus (Globus Transfer)
    staging: Literal["shared", "globus"] = "shared"
    globus_source_collection: str = ""  # collection UUID where the scans are written
    globus_dest_collection: str = ""  # collection UUID the executor reads
    globus_dest_dir: str = ""  # path on the destination collection
    transfer_timeout_s: Seconds = 600.0
    # who the service is to Globus Transfer (remote/globus_login.py): a native app's client
    # id, its tokens stored by `edgeloop globus login` (refreshed by globus-sdk); or
    # GLOBUS_CLIENT_ID / GLOBUS_CLIENT_SECRET of a confidential client in the environment
    globus_client_id: str = ""
    globus_token_file: str = "~/.edgeloop/globus_tokens.db"
    # ask for the collections' data_access consent (Globus Connect Server v5 mapped
    # collections need it; turn off for Globus Connect Personal)
    globus_data_access: bool = True
    # ml:ReferenceError: the service phase-retrieves a window of this many consecutive
    # frames at the start of each acquisition and every ``reference_every`` frames after
    # (30 of a 500-point scan: 6 %; of 1000 frames: 3 %), HEDM a few frames' peaks
    reference: bool = True
    reference_window: Annotated[int, Field(ge=4)] = 30
    reference_every: Count = 1000
    reference_hedm_frames: Count = 2
    reference_hedm_every: Count = 60


@dataclass(config=SECTION)
class PolicyConfig:
    """When the retraining service retrains by itself (remote/policy.py).  The IOC holds
    the live values (ml:AutoRetrain, ml:AutoThreshold, ml:AutoMinInterval, ml:AutoMinFrames);
    these are what it starts with."""

    enabled: bool = False
    # edge:ScanConsistency of a new scan above: retrain; ptychography in rad (a flat,
    # untrained PtychoNN scores ~0.093, the demo's trained one ~0.065), HEDM in px
    threshold: NonNegative = 0.08
    threshold_px: NonNegative = 0.4
    min_interval_s: NonNegative = 60.0
    min_new_frames: Count = 200  # new frames unlike the training set that trigger by themselves
    # a new frame is unlike the training set when no trained frame lies this close
    novelty_um: Positive = 0.1  # ptychography: stage distance
    novelty_deg: Positive = 1.0  # HEDM: rotation angle
    poll_s: Seconds = 2.0  # how often the service looks for new scans


@dataclass(config=SECTION)
class RetentionConfig:
    """What the retraining service keeps over a beamtime (remote/retention.py), pruned after
    each retraining: the rest is deleted before the disk fills and scans are lost."""

    keep_best: Count = 5  # accepted versions of each kind by validation loss, beside the
    # serving and the previous one (older versions keep their metadata, not their weights)
    labels_gb: Positive = 4.0  # labels files of past retrainings (~0.2 GB per 4,000 frames)
    cache_gb: Positive = 8.0  # the per-scan labels cache, least recently written first
    parsl_runs: Count = 5  # Parsl run directories
    disk_check_s: Seconds = 30.0  # how often ml:DiskFree is posted
    disk_minor_gb: NonNegative = 50.0  # ml:DiskFree MINOR below
    disk_major_gb: NonNegative = 10.0  # MAJOR below


@dataclass(config=SECTION)
class PositionsConfig:
    """The NDAttributes that carry the sample stage's position in each detector frame and
    file: the names the beamline's attributes file gives them (an EPICS_PV attribute per
    axis). Runs recorded by RunIndex keep the names they were taken with."""

    x: AttributeName = "SampleX"  # micrometres
    y: AttributeName = "SampleY"  # micrometres
    rotation: AttributeName = "SampleRot"  # degrees (HEDM)

    def of(self, technique: str) -> tuple[str, ...]:
        """The names of a technique's positions: (x, y) for ptychography, (rotation,)."""
        return (self.rotation,) if technique == "hedm" else (self.x, self.y)


@dataclass(config=SECTION)
class TiledConfig:
    """Where Bluesky runs are stored and found: a Tiled server (TiledWriter records each
    run; the retraining and its policy find runs there and read their frames through it).
    With no ``uri``, the embedded one: a SimpleTiledServer under ``<data_dir>/tiled``,
    which the demo and the IPython profile start."""

    enabled: bool = True  # false: runs as files in data_dir (RunIndex entries, scan files)
    uri: str = ""  # a facility's server, e.g. "https://tiled.example.org/api/v1"
    # "": $TILED_API_KEY, else (the embedded server) the key kept in <data_dir>/tiled
    api_key: str = ""
    port: Annotated[int, Field(ge=1, le=65535)] = TILED_PORT  # the embedded server's


@dataclass(config=SECTION)
class RecordsConfig:
    """A model record (edgeloop/model_records.py: ONNX graph, weights, model card,
    checksums, the gate's signature) written for each version the edge accepts, under
    ``<registry_dir>/records``; optionally pushed to an MLflow model registry too."""

    enabled: bool = True
    licence: str = "CC-BY-4.0"  # the licence the cards state for the trained weights
    # an MLflow tracking server ("http://127.0.0.1:5000", "sqlite:///mlflow.db"): each
    # record is registered there as well, its version's alias and tags following the
    # edge's accepted/rejected states (pip install 'edgeloop[mlflow]'); "": none
    mlflow_uri: str = ""


@dataclass(config=SECTION)
class SecurityConfig:
    """Who may change what is served, and what a model file may hold."""

    # users (CA/PVA account names) who may write the control PVs; empty: the user running
    # edgeloop.  The retraining service's user may write them too.
    operators: tuple[str, ...] = ()
    service_user: str = ""  # the retraining service's account; "": the user running it
    hosts: tuple[str, ...] = ()  # hosts control writes may come from; empty: any host
    # HMAC-SHA256 key shared by the service and the executor that trains (a file, mode
    # 0600; created with a random key on first use when it is the default path)
    signing_key_file: str = "~/.edgeloop/signing.key"
    # where the executor reads its copy of that key on its own machine; "": the same path
    # (a shared filesystem, or a copy kept at the same path there)
    executor_signing_key_file: str = ""
    # the quality gate's Ed25519 key pair (edgeloop/approval.py): the service signs each
    # version it accepts with the private key; the edge loads only versions whose signature
    # its copy of the public key verifies. "": gate.key / gate.pub beside signing_key_file
    # (the pair is created there on first use)
    gate_key_file: str = ""
    gate_public_key_file: str = ""
    max_model_bytes: Count = 256 * 1024 * 1024  # a model file larger is refused unread
    max_width: Count = 256  # any width in a model file's architecture above: refused
    max_patch: Count = 64  # BraggNN patch side above: refused


class ConfigError(ValueError):
    """A configuration that does not validate; the message names each bad key."""


@dataclass(config=SECTION)
class Config:
    prefix: Annotated[str, Field(min_length=1)] = "SIM:"
    mode: Mode = "ptycho"  # the detector's mode at start; frames carry their own (Mode)
    data_dir: str = "~/.edgeloop/data"  # scans (HDF5) written by the Bluesky callback
    registry_dir: str = "~/.edgeloop/models"
    executor: str = "local"
    sim: SimConfig = field(default_factory=SimConfig)
    hedm: HedmConfig = field(default_factory=HedmConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    # PtychoNN: labels + physics (docs/explanations/training.md)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(loss="both"))
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    positions: PositionsConfig = field(default_factory=PositionsConfig)
    tiled: TiledConfig = field(default_factory=TiledConfig)
    records: RecordsConfig = field(default_factory=RecordsConfig)
    # BraggNN trains on thousands of small patches: bigger batches, a higher rate, and only
    # the newest frames (each gives ~20 peaks, each peak a ~5 ms pseudo-Voigt fit).  One
    # thread: its tensors are too small for a second to help, and a busy second core makes
    # two threads several times slower.
    train_hedm: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            epochs=80,
            batch_size=64,
            lr=2e-3,
            lr_min=1e-5,
            schedule="cosine",
            max_frames=300,
            threads=1,
        )
    )

    def __post_init__(self):
        if self.train_hedm.loss != "labels":
            raise ValueError(
                f"train_hedm.loss {self.train_hedm.loss!r}: BraggNN trains on labels only "
                "(the physics loss is PtychoNN's)"
            )

    def arch(self, kind: str) -> dict:
        """Constructor arguments of a model kind's network."""
        if kind == "braggnn":
            return {"patch": self.model.patch, "width": self.model.braggnn_width}
        if self.model.decoder == "skip":
            return {"width": self.model.width, "skip": 1}
        return {"width": self.model.width}

    def input_size(self, kind: str) -> int:
        return self.model.patch if kind == "braggnn" else self.model.input_size

    def training(self, kind: str) -> TrainConfig:
        return self.train_hedm if kind == "braggnn" else self.train

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    @property
    def registry_path(self) -> Path:
        return Path(self.registry_dir).expanduser()

    @property
    def engine_cache_path(self) -> Path:
        """Where the tensorrt backend keeps its engines (edge.engine_cache)."""
        if self.edge.engine_cache:
            return Path(self.edge.engine_cache).expanduser()
        return self.registry_path / "engines"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Config:
        """A configuration from (a subset of) ``to_dict()``; a section given in part keeps
        its other defaults (``train_hedm`` its own)."""
        merged = cls().to_dict()
        for key, value in _renamed(data).items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        try:
            return TypeAdapter(cls).validate_python(merged)
        except ValidationError as exc:
            raise ConfigError(describe(exc)) from None

    @classmethod
    def load(cls, path: str | os.PathLike | None) -> Config:
        if path is None:
            return cls()
        return cls.from_dict(json.loads(Path(path).read_text()))

    def dump(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def _renamed(data: dict) -> dict:
    """``data`` with the keys of RENAMED under their new names."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for (section, old), new in RENAMED.items():
        values = data.get(section)
        if isinstance(values, dict) and old in values:
            log.warning("configuration key %s.%s is now %s.%s", section, old, section, new)
            values.setdefault(new, values.pop(old))
    return data


def describe(exc: ValidationError) -> str:
    """One line per error, each naming the key: ``edge.max_batch: Input should be ...``."""
    lines = []
    for err in exc.errors(include_url=False):
        key = ".".join(str(part) for part in err["loc"])
        if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            lines.append(f"unknown configuration key {key!r}")
        elif isinstance(err["input"], dict):  # a check across a section's keys
            lines.append(f"{key}: {err['msg']}")
        else:
            lines.append(f"{key}: {err['msg']} (got {err['input']!r})")
    return "invalid configuration: " + "; ".join(lines)
