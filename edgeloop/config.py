"""Configuration shared by every part: one dataclass, embedded defaults, JSON overrides."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

# Two CA servers on one host cannot share UDP port 5064 for unicast searches (the kernel
# hands each datagram to one socket), so the simulated beamline serves CA on its own port
# and clients search both; the real ML IOC keeps the standard 5064.  A second simulated
# system on the same host sets EDGELOOP_BEAMLINE_CA_PORT to another port.
BEAMLINE_CA_PORT = int(os.environ.get("EDGELOOP_BEAMLINE_CA_PORT", "5066"))

LOOPBACK_ENV = {
    "EPICS_CA_ADDR_LIST": f"127.0.0.1 127.0.0.1:{BEAMLINE_CA_PORT}",
    "EPICS_CA_AUTO_ADDR_LIST": "NO",
    "EPICS_PVA_ADDR_LIST": "127.0.0.1",
    "EPICS_PVA_AUTO_ADDR_LIST": "NO",
    "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
}


def pin_loopback(environ: dict | os._Environ = os.environ) -> None:
    """Keep all EPICS traffic on loopback unless the caller set the variables already."""
    for key, value in LOOPBACK_ENV.items():
        environ.setdefault(key, value)


@dataclass
class SimConfig:
    """The simulated ptychography experiment (ioc/physics.py)."""

    object_size: int = 640  # object pixels per side; stage (0, 0) is the centre
    pixel_um: float = 0.01  # object pixel size (10 nm)
    frame_size: int = 64  # detector pixels per side
    probe_radius_px: float = 12.0 # aperture radius in detector pixels (sets probe width)
    probe_defocus: float = 10.0 # quadratic phase of the probe pupil, radians at the edge
    photons: float = 1.0e6  # photons per frame
    max_phase: float = 1.0  # phase of the thickest feature, radians
    feature_blur_px: float = 3.0  # edge softness of the test pattern (Gaussian sigma)
    absorption: float = 0.1  # amplitude = exp(-absorption * phase)
    seed: int = 7


@dataclass
class HedmConfig:
    """The simulated HEDM experiment (ioc/hedm.py)."""

    frame_size: int = 512  # detector pixels per side
    n_grains: int = 12
    # reflections each grain gives over a full turn; 12 x 60 = 720 puts ~20 lit peaks in a
    # frame (a reflection is lit over ~+-3 sigma of omega, about 9 deg of 360)
    reflections_per_grain: int = 60
    n_rings: int = 5  # Debye-Scherrer rings (fcc spacing)
    ring_radius_range: tuple[float, float] = (0.15, 0.45)  # fraction of frame_size
    omega_width_deg: float = 1.5  # sigma of a reflection's intensity in omega
    azimuth_drift_rad: float = 0.3  # azimuth = az0 + drift * sin(omega - omega_peak)
    fwhm_range: tuple[float, float] = (1.2, 3.0)  # pixels
    eta_range: tuple[float, float] = (0.0, 0.8)  # Lorentzian fraction
    asym_max: float = 0.15  # +x side FWHM is fwhm_x * (1 + asym), |asym| <= asym_max
    intensity_range: tuple[float, float] = (300.0, 5000.0)  # counts at peak
    background: float = 20.0  # mean counts per pixel (Poisson)
    saturation: int = 65535  # uint16 detector: clipped here and flagged
    min_height: float = 10.0  # a reflection is lit (rendered, in truth) above this height
    render_tol: float = 0.5  # counts: a peak's box extends until its tail falls below this
    overlap_fraction: float = 0.15  # reflections placed a few pixels from a partner
    seed: int = 11


# The technique decides the network: the detector's Mode, the scan files' technique and the
# model kind the edge serves and remote/ trains all follow from it.
MODES = ("ptycho", "hedm")
MODE_KIND = {"ptycho": "ptychonn", "hedm": "braggnn"}
MODE_TECHNIQUE = {"ptycho": "ptychography", "hedm": "hedm"}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {list(MODES)}")
    return mode


@dataclass
class ModelConfig:
    """The networks served at the edge and trained by remote/."""

    input_size: int = 64  # PtychoNN: frames are brought to this size before inference
    width: int = 8  # channels of the first encoder block (published PtychoNN: 32, 1.15 M
    # parameters); 8 keeps CPU training of the demo within minutes
    patch: int = 11  # BraggNN: patch side cropped around each peak
    braggnn_width: int = 64  # BraggNN's first conv channels (published: 64)


@dataclass
class EdgeConfig:
    queue_size: int = 256
    max_batch: int = 16
    backend: str = "torch"
    threads: int = 1
    map_size: int = 640  # phase-map canvas, object pixels; same geometry as SimConfig
    map_publish_s: float = 0.5
    stitch_sigma_px: float = 6.0  # Gaussian weight of each patch in the map (~ probe size)
    stats_publish_s: float = 0.5
    peak_sigma: float = 8.0  # HEDM: a peak pixel exceeds background + sigma * noise
    peak_min_separation: int = 3  # HEDM: pixels between two maxima kept as two peaks


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 16
    lr: float = 1e-3
    lr_min: float = 1e-4
    # "cyclic": triangular2 between lr_min and lr (PtychoNN's schedule); "cosine": anneal
    # from lr to lr_min over the whole run (BraggNN: the annealed tail gives the last
    # hundredths of a pixel)
    schedule: str = "cyclic"
    val_fraction: float = 0.1
    recon_epochs: int = 30  # iterative phase retrieval epochs (labels)
    recon_algorithm: str = "LSQML"
    max_frames: int = 4000  # newest frames kept for training
    seed: int = 0
    threads: int = 2
    keep_initial: bool = False  # set when training from a checkpoint (remote/tasks.py)


@dataclass
class RemoteConfig:
    """Where retraining runs (remote/executors.py) and how its data get there."""

    parsl_config_file: str = ""  # Python file defining `config` (Slurm, PBS, ...); "":
    # one HighThroughputExecutor with a LocalProvider on this machine
    parsl_workers: int = 1
    parsl_worker_init: str = ""  # shell run before a worker starts (e.g. activate a venv)
    globus_endpoint_id: str = ""  # Globus Compute endpoint UUID
    task_timeout_s: float = 1800.0  # a step running longer is abandoned -> Error
    quality_margin: float = 0.05  # a new model may be at most 5 % worse (held-out loss)
    staging: str = "shared"  # shared (same filesystem) or globus (Globus Transfer)
    globus_source_collection: str = ""  # collection UUID where the scans are written
    globus_dest_collection: str = ""  # collection UUID the executor reads
    globus_dest_dir: str = ""  # path on the destination collection
    transfer_timeout_s: float = 600.0


@dataclass
class Config:
    prefix: str = "SIM:"
    mode: str = "ptycho"  # the detector's mode at start; frames carry their own (Mode)
    data_dir: str = "~/.edgeloop/data"  # scans (HDF5) written by the Bluesky callback
    registry_dir: str = "~/.edgeloop/models"
    executor: str = "local"
    sim: SimConfig = field(default_factory=SimConfig)
    hedm: HedmConfig = field(default_factory=HedmConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    # BraggNN trains on thousands of small patches: bigger batches, a higher rate, and only
    # the newest frames (each gives ~20 peaks, each peak a ~5 ms pseudo-Voigt fit).  One
    # thread: its tensors are too small for a second to help, and a busy second core makes
    # two threads several times slower.
    train_hedm: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=80, batch_size=64, lr=2e-3, lr_min=1e-5, schedule="cosine", max_frames=300,
        threads=1))

    def __post_init__(self):
        check_mode(self.mode)

    def arch(self, kind: str) -> dict:
        """Constructor arguments of a model kind's network."""
        if kind == "braggnn":
            return {"patch": self.model.patch, "width": self.model.braggnn_width}
        return {"width": self.model.width}

    def input_size(self, kind: str) -> int:
        return self.model.patch if kind == "braggnn" else self.model.input_size

    def training(self, kind: str) -> "TrainConfig":
        return self.train_hedm if kind == "braggnn" else self.train

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    @property
    def registry_path(self) -> Path:
        return Path(self.registry_dir).expanduser()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        defaults = cls()
        sections = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key not in sections:
                raise ValueError(f"unknown configuration key {key!r}")
            if isinstance(value, dict):
                section = getattr(defaults, key)  # keys not given keep this section's defaults
                names = {f.name for f in dataclasses.fields(section)}
                unknown = set(value) - names
                if unknown:
                    raise ValueError(f"unknown keys in [{key}]: {sorted(unknown)}")
                kwargs[key] = dataclasses.replace(section, **value)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | os.PathLike | None) -> "Config":
        if path is None:
            return cls()
        return cls.from_dict(json.loads(Path(path).read_text()))

    def dump(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))
