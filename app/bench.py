"""``edgeloop bench --out DIR``: the edge's speed at detector sizes, beside its ceilings and
pvapy's streaming framework, measured in one run on this machine.

The source of every case is pvapy's ``pvapy-ad-sim-server`` (pvDatabase, C++ transport)
serving a file of 16 cached frames the bench writes first: simulated ptychography
(int32) at 64, 256 and 512 px, simulated HEDM (uint16, 512 px) with ~20 and ~50 peaks, and
the 512 px ptychography frames bitshuffle/LZ4-compressed by hdf5plugin and sent compressed.
For each case:

- ``passthrough_fps``: a p4p client, the edge's monitor request, fed by the source at full
  speed, no inference (``pvapy_client_fps``: pvapy's own client, same source);
- ``inference_fps``: the model in this process on the decoded frames, no PVA (ptychography
  in batches of ``edge.max_batch``; HEDM: peak finding + BraggNN per frame, as the edge);
- ``e2e_fps``: source -> PVA -> ``edgeloop edge`` (its own process) -> ``edge:Phase`` /
  ``edge:Peaks``, counted by an independent p4p client; the source offers 1.25 x
  min(passthrough, inference), so that it is not the limit, and the edge drops what it
  cannot take (``dropped``: the edge's Dropped + MissedFrames over the window);
  ``latency_ms_p50/p99`` from each frame's time stamp (set by the source) to the answer's
  arrival at that client; ``rss_mb``: the edge's resident memory at the end;
- ``pvapy_fps``: ``pvapy-hpc-consumer`` with :mod:`edgeloop.app.pvapy_processor` (the same
  model, backend and threads) on the same offer, counted the same way.

``--steady-minutes M`` then streams the 512 px ptychography case (or, when it was not run,
the first case) at 80 % of its measured e2e rate for M minutes and reports drops, latency
and the edge's memory every 10 s.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil
from p4p.client.thread import Context

from edgeloop import ntnd
from edgeloop.app.processes import ManagedProcess, wait_for_pv
from edgeloop.app.pvapy_source import AdSimServer
from edgeloop.config import LOOPBACK_ENV, MODE_KIND, Config
from edgeloop.edge_pva.inference import untrained_model
from edgeloop.edge_pva.peak_tables import locate_peaks
from edgeloop.edge_pva.server import MONITOR_REQUEST

log = logging.getLogger(__name__)

BIN = Path(sys.executable).parent
DISTINCT_FRAMES = 16
OFFER = 1.25  # the source offers this times the lower ceiling in the e2e runs
STEADY_FRACTION = 0.8
SERVER_QUEUE = 32  # frames the source's server holds for the edge (its monitor request)


@dataclass(frozen=True)
class Case:
    name: str
    mode: str  # ptycho | hedm
    size: int
    grains: int = 18  # HEDM: the finder finds ~20 peaks a frame of 18 grains, ~50 of 44
    codec: str = ""  # "bslz4": sent compressed, as written by hdf5plugin


CASES = (
    Case("ptycho64", "ptycho", 64),
    Case("ptycho256", "ptycho", 256),
    Case("ptycho512", "ptycho", 512),
    Case("hedm512-20peaks", "hedm", 512, grains=18),
    Case("hedm512-50peaks", "hedm", 512, grains=44),
    Case("ptycho512-bslz4", "ptycho", 512, codec="bslz4"),
)


@dataclass
class Result:
    case: str
    frame: str  # e.g. "512x512 int32"
    passthrough_fps: float = 0.0
    pvapy_client_fps: float | None = None
    inference_fps: float = 0.0
    e2e_fps: float = 0.0  # saturated: the source offers OFFER x the lower ceiling
    offered_fps: float = 0.0
    dropped_saturated: int = 0
    latency_ms_p99_saturated: float = float("nan")  # queueing: below latency_bound_ms
    latency_bound_ms: float = float("nan")  # (edge queue + server queue) / e2e_fps
    paced_fps: float = 0.0  # STEADY_FRACTION x e2e_fps: the figures below
    latency_ms_p50: float = float("nan")
    latency_ms_p99: float = float("nan")
    dropped: int = 0
    rss_mb: float = 0.0
    pvapy_fps: float | None = None
    peaks_per_frame: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ceiling(self) -> float:
        return min(self.passthrough_fps, self.inference_fps)


# ---- frames ------------------------------------------------------------------------------
def case_frames(case: Case, cfg: Config) -> np.ndarray:
    """DISTINCT_FRAMES frames of the case from the project's simulators."""
    if case.mode == "hedm":
        from edgeloop.ioc.hedm_sim import HedmSimulator

        hedm = dataclasses.replace(cfg.hedm, frame_size=case.size, n_grains=case.grains)
        sim = HedmSimulator(hedm)
        return np.stack([sim.frame(float(w))[0] for w in np.linspace(0, 90, DISTINCT_FRAMES)])
    from edgeloop.ioc.physics import PtychoSimulator

    geometry = {"frame_size": case.size, "object_size": max(cfg.sim.object_size, case.size + 128)}
    sim = PtychoSimulator(dataclasses.replace(cfg.sim, **geometry))
    xy = np.random.default_rng(0).uniform(-0.8, 0.8, (DISTINCT_FRAMES, 2)) * sim.max_travel_um
    return np.stack([sim.frame(float(x), float(y)) for x, y in xy])


def write_source_file(case: Case, frames: np.ndarray, folder: Path) -> Path:
    """What pvapy-ad-sim-server streams: .npy, or HDF5 chunks compressed by hdf5plugin."""
    folder.mkdir(parents=True, exist_ok=True)
    if not case.codec:
        path = folder / f"{case.name}.npy"
        np.save(path, frames)
        return path
    import h5py
    import hdf5plugin

    path = folder / f"{case.name}.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "entry/data",
            data=frames,
            chunks=(1, *frames.shape[1:]),
            **hdf5plugin.Bitshuffle(cname="lz4"),
        )
    return path


# ---- processes -----------------------------------------------------------------------------
def _source(channel: str, path: Path, fps: float, logs: Path, delay: float) -> AdSimServer:
    """pvapy-ad-sim-server publishing ``path``'s frames on ``channel`` at ``fps`` (0: as
    fast as it can), recycling its cache, until stopped."""
    args = ["-if", str(path), "-cs", str(DISTINCT_FRAMES), "-rp", "0"]
    if path.suffix == ".h5":
        args += ["-hds", "/entry/data", "-hcm"]
    log = logs / f"source-{channel.replace(':', '_')}.log"
    return AdSimServer(
        channel, args, log, fps=fps, runtime=100000, start_delay=delay, shutdown_delay=0
    )


@contextlib.contextmanager
def source(channel: str, path: Path, fps: float, logs: Path, ctx: Context, delay: float = 0):
    """The source, publishing; or, with ``delay``, started and publishing ``delay`` s later
    (clients connect before: pvapy's client may not connect to a source at full speed)."""
    src = _source(channel, path, fps, logs, delay or 0.5)
    try:
        yield src if delay else src.wait_sending(ctx)
    finally:
        src.stop()


FIRST_ANSWER_S = 120.0  # an edge or source that has not answered by then has failed


class Counter:
    """An independent p4p client: distinct answers on ``pv`` inside the window, and each
    one's age (arrival - its time stamp)."""

    def __init__(self, ctx: Context, pv: str, request: str | None = None):
        # edge:Peaks (an NTTable) carries its frame's uniqueId in timeStamp.userTag
        self.tagged = pv.endswith(":Peaks")
        if request is None:
            request = "field(timeStamp)" if self.tagged else "field(uniqueId,timeStamp)"
        self.t0 = self.t1 = None
        self.first = threading.Event()  # set by the first answer, window or not
        self.seen: set[int] = set()
        self.ages: list[float] = []
        self._lock = threading.Lock()
        self.sub = ctx.monitor(pv, self._on, request=request)

    def _on(self, value) -> None:
        now = time.time()
        if isinstance(value, Exception):
            return
        uid = int(value["timeStamp.userTag"] if self.tagged else value["uniqueId"])
        if not uid:
            return
        self.first.set()
        with self._lock:
            if self.t0 is None or self.t1 is not None or now < self.t0:
                return
            self.seen.add(uid)
            self.ages.append(now - ntnd.epoch_seconds(value))
            self._touch(value)

    def _touch(self, value) -> None:
        pass

    def wait_first(self, timeout: float = FIRST_ANSWER_S) -> None:
        """Until the first answer: a loaded host can take far longer than the warm-up to
        start an edge and connect it, and a window before that measures nothing."""
        if not self.first.wait(timeout):
            raise TimeoutError(f"no answer on {self.sub.name} within {timeout:.0f} s")

    def start(self) -> None:
        with self._lock:
            self.t0 = time.time()

    def stop(self) -> float:
        """Answers/s since :meth:`start`."""
        with self._lock:
            self.t1 = time.time()
            return len(self.seen) / (self.t1 - self.t0)

    def window(self, seconds: float) -> float:
        """Count for ``seconds`` from now; answers/s."""
        self.start()
        time.sleep(seconds)
        return self.stop()

    def latency_ms(self) -> tuple[float, float]:
        if not self.ages:
            return float("nan"), float("nan")
        p50, p99 = np.percentile(np.array(self.ages) * 1e3, [50, 99])
        return float(p50), float(p99)

    def close(self) -> None:
        self.sub.close()


class FrameCounter(Counter):
    """The edge's own input client without the edge: whole frames, their pixels touched."""

    def __init__(self, ctx: Context, pv: str):
        super().__init__(ctx, pv, request=MONITOR_REQUEST)

    def _touch(self, value) -> None:
        value["value"]  # noqa: B018 (the pixels, as the edge takes them)


PVAPY_CLIENT = """
import json, sys, threading, time
import pvaccess as pva
seen = set(); lock = threading.Lock(); on = [False]; first = threading.Event()
def cb(pv):
    first.set()
    with lock:
        if on[0]:
            seen.add(pv['uniqueId'])
ch = pva.Channel(sys.argv[1])
ch.setMonitorMaxQueueLength(32)
ch.monitor(cb, 'field()')
if not first.wait(30):
    sys.exit('no frame from ' + sys.argv[1] + ' in 30 s')
time.sleep(float(sys.argv[2]))
with lock:
    on[0] = True; t0 = time.time()
time.sleep(float(sys.argv[3]))
with lock:
    on[0] = False; n = len(seen); t1 = time.time()
ch.stopMonitor()
print(json.dumps({"fps": n / (t1 - t0)}))
"""


def pvapy_client_fps(channel: str, warmup: float, seconds: float) -> float:
    """pvapy's own client (its own process) on the same source."""
    out = subprocess.run(
        [sys.executable, "-c", PVAPY_CLIENT, channel, str(warmup), str(seconds)],
        capture_output=True,
        text=True,
        timeout=warmup + seconds + 60,
        env={**os.environ, **LOOPBACK_ENV},
    )
    if out.returncode:
        raise RuntimeError(f"pvapy client failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["fps"]


# ---- ceilings ------------------------------------------------------------------------------
def inference_fps(cfg: Config, mode: str, frames: np.ndarray, seconds: float = 4.0):
    """Frames/s of the model alone (the edge's preprocessing included) on decoded frames,
    and the mean number of peaks (HEDM)."""
    import torch

    torch.set_num_threads(cfg.edge.threads)
    served = untrained_model(cfg, MODE_KIND[mode])
    edge = cfg.edge
    batch = edge.max_batch if mode == "ptycho" else 1
    peaks: list[int] = []

    def run(i: int) -> None:
        if mode == "ptycho":
            served.infer([frames[(i + k) % len(frames)] for k in range(batch)])
        else:
            found, _, _ = locate_peaks(
                frames[i % len(frames)],
                served.infer,
                served.input_size,
                sigma=edge.peak_sigma,
                min_separation=edge.peak_min_separation,
                max_peaks=edge.max_peaks_per_frame,
            )
            peaks.append(len(found["x"]))

    run(0)  # warm-up
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        run(done)
        done += batch
    rate = done / (time.perf_counter() - t0)
    return rate, (float(np.mean(peaks)) if peaks else None)


# ---- runs ----------------------------------------------------------------------------------
class Bench:
    def __init__(self, out: Path, cfg: Config, seconds: float = 8.0, warmup: float = 3.0):
        self.out, self.cfg = out, cfg
        self.seconds, self.warmup = seconds, warmup
        self.prefix = f"BENCH{uuid.uuid4().hex[:6]}:"
        self.logs = out / "logs"
        self.cfg_path = out / "edge_config.json"

    def _case_config(self, case: Case) -> Path:
        cfg = copy.deepcopy(self.cfg)
        cfg.mode = case.mode
        cfg.prefix = self.prefix
        cfg.registry_dir = str(self.out / "models")  # empty: the untrained model, as the baseline
        cfg.data_dir = str(self.out / "data")
        path = self.out / f"config-{case.name}.json"
        cfg.dump(path)
        return path

    def passthrough(self, ctx: Context, channel: str) -> float:
        counter = FrameCounter(ctx, channel)
        try:
            counter.wait_first()
            time.sleep(self.warmup)
            return counter.window(self.seconds)
        finally:
            counter.close()

    @contextlib.contextmanager
    def edge(self, ctx: Context, cfg_path: Path, channel: str, log_name: str):
        """``edgeloop edge`` in its own process on ``channel``, until the block ends."""
        proc = ManagedProcess(
            "edge",
            ["edge", "--prefix", self.prefix, "--config", str(cfg_path), "--input-pv", channel],
            self.logs / f"edge-{log_name}.log",
        )
        try:
            wait_for_pv(ctx, f"{self.prefix}edge:FramesIn", 60, proc)
            yield psutil.Process(proc.proc.pid)
        finally:
            proc.stop()

    def answers(self, ctx: Context, output: str, seconds: float, edge=None) -> dict:
        """Count the answers on ``output`` for ``seconds`` after the warm-up: answers/s,
        latency, the edge's drops in the window and its memory every 10 s."""
        counter = Counter(ctx, output)
        try:
            counter.wait_first()
            time.sleep(self.warmup)
            lost0 = _lost(ctx, self.prefix) if edge else 0
            rss: list[tuple[float, float]] = []
            counter.start()
            t0 = time.monotonic()
            while (left := seconds - (time.monotonic() - t0)) > 0:
                if edge:
                    rss.append((time.monotonic() - t0, edge.memory_info().rss / 2**20))
                time.sleep(min(10.0, left))
            fps = counter.stop()
            if edge:
                rss.append((time.monotonic() - t0, edge.memory_info().rss / 2**20))
            p50, p99 = counter.latency_ms()
            return {
                "fps": fps,
                "answered": len(counter.seen),
                "p50": p50,
                "p99": p99,
                "dropped": _lost(ctx, self.prefix) - lost0 if edge else None,
                "rss": rss,
            }
        finally:
            counter.close()

    def pvapy_run(self, ctx: Context, channel: str, cfg_path: Path) -> float:
        out_pv = f"{self.prefix}pvapy:{channel.rsplit(':', 1)[-1]}"
        args = ["--input-channel", channel, "--output-channel", out_pv]
        args += ["--processor-class", "edgeloop.app.pvapy_processor.EdgeloopProcessor"]
        args += ["--processor-args", json.dumps({"config": str(cfg_path)})]
        args += ["--server-queue-size", "32", "--report-period", "0", "--disable-curses"]
        proc = ManagedProcess(
            "pvapy-hpc-consumer",
            args,
            self.logs / f"pvapy-{channel.rsplit(':', 1)[-1]}.log",
            program=[str(BIN / "pvapy-hpc-consumer")],
        )
        try:
            wait_for_pv(ctx, out_pv, 60, proc)
            return self.answers(ctx, out_pv, self.seconds)["fps"]
        finally:
            proc.stop(timeout=5)

    @staticmethod
    def _baseline(res: Result, what: str, measure, *args) -> float | None:
        """A baseline that fails is a note in the case, not the end of the bench."""
        try:
            return measure(*args)
        except (RuntimeError, TimeoutError, subprocess.SubprocessError) as exc:
            log.warning("%s: %s failed: %s", res.case, what, exc)
            res.notes.append(f"{what} failed: {str(exc)[:300]}")
            return None

    def case(self, ctx: Context, case: Case, pvapy: bool = True) -> Result:
        frames = case_frames(case, self.cfg)
        path = write_source_file(case, frames, self.out / "frames")
        cfg_path = self._case_config(case)
        label = f"{case.size}x{case.size} {frames.dtype}" + (
            f" {case.codec}" if case.codec else ""
        )
        res = Result(case.name, label)
        cfg = Config.load(cfg_path)
        res.inference_fps, res.peaks_per_frame = inference_fps(cfg, case.mode, frames)
        channel = f"{self.prefix}src:{case.name.replace('-', '_')}"
        output = f"{self.prefix}edge:{'Peaks' if case.mode == 'hedm' else 'Phase'}"
        with source(channel, path, 0, self.logs, ctx):
            res.passthrough_fps = self.passthrough(ctx, channel)
        if pvapy:
            with source(channel, path, 0, self.logs, ctx, delay=3.0):
                res.pvapy_client_fps = self._baseline(
                    res, "pvapy client", pvapy_client_fps, channel, self.warmup, self.seconds
                )
        # saturated: the source offers more than the lower ceiling
        res.offered_fps = OFFER * res.ceiling
        with source(channel, path, res.offered_fps, self.logs, ctx):
            with self.edge(ctx, cfg_path, channel, f"{case.name}-saturated") as edge:
                sat = self.answers(ctx, output, self.seconds, edge)
            if pvapy:
                res.pvapy_fps = self._baseline(
                    res, "pvapy framework", self.pvapy_run, ctx, channel, cfg_path
                )
        res.e2e_fps, res.dropped_saturated = sat["fps"], sat["dropped"]
        res.latency_ms_p99_saturated = sat["p99"]
        res.latency_bound_ms = (cfg.edge.queue_size + SERVER_QUEUE) / max(sat["fps"], 1e-9) * 1e3
        # paced at STEADY_FRACTION of what the edge answered: the latency of a kept-up stream
        res.paced_fps = STEADY_FRACTION * res.e2e_fps
        with source(channel, path, res.paced_fps, self.logs, ctx):
            with self.edge(ctx, cfg_path, channel, f"{case.name}-paced") as edge:
                paced = self.answers(ctx, output, self.seconds, edge)
        res.latency_ms_p50, res.latency_ms_p99 = paced["p50"], paced["p99"]
        res.dropped, res.rss_mb = paced["dropped"], paced["rss"][-1][1]
        return res

    def steady(self, ctx: Context, case: Case, rate: float, minutes: float) -> dict:
        """``rate`` frames/s for ``minutes``: drops, latency and the edge's memory."""
        frames = case_frames(case, self.cfg)
        path = write_source_file(case, frames, self.out / "frames")
        cfg_path = self._case_config(case)
        channel = f"{self.prefix}steady:{case.name.replace('-', '_')}"
        output = f"{self.prefix}edge:{'Peaks' if case.mode == 'hedm' else 'Phase'}"
        with source(channel, path, rate, self.logs, ctx):
            with self.edge(ctx, cfg_path, channel, "steady") as edge:
                got = self.answers(ctx, output, minutes * 60, edge)
        rss = got["rss"]
        # the first minute fills caches and allocator pools; growth is counted after it
        settled = [m for t, m in rss if t >= min(60.0, rss[-1][0] / 2)]
        return {
            "case": case.name,
            "offered_fps": rate,
            "minutes": minutes,
            "answered": got["answered"],
            "answered_fps": got["fps"],
            "dropped": got["dropped"],
            "latency_ms_p50": got["p50"],
            "latency_ms_p99": got["p99"],
            "rss_mb_start": rss[0][1],
            "rss_mb_end": rss[-1][1],
            "rss_mb_max": max(m for _, m in rss),
            "rss_growth_mb_after_1min": max(settled) - settled[0] if settled else 0.0,
            "rss_bound_mb": RSS_BOUND_MB,
            "rss_samples": rss,
        }


RSS_BOUND_MB = 32.0  # growth of the edge's resident memory allowed after its first minute


def _lost(ctx: Context, prefix: str) -> int:
    got = ctx.get([f"{prefix}edge:Dropped", f"{prefix}edge:MissedFrames"], timeout=5)
    return sum(int(v["value"]) for v in got)


# ---- report --------------------------------------------------------------------------------
COLUMNS = (
    ("case", "case", "{}"),
    ("frame", "frame", "{}"),
    ("pass", "passthrough_fps", "{:.0f}"),
    ("pvapy cl", "pvapy_client_fps", "{:.0f}"),
    ("infer", "inference_fps", "{:.0f}"),
    ("e2e", "e2e_fps", "{:.0f}"),
    ("e2e/min", None, "{:.2f}"),
    ("pvapy fw", "pvapy_fps", "{:.0f}"),
    ("e2e/pvapy", None, "{:.2f}"),
    ("drop sat", "dropped_saturated", "{}"),
    ("p99 sat", "latency_ms_p99_saturated", "{:.0f}"),
    ("bound", "latency_bound_ms", "{:.0f}"),
    ("paced", "paced_fps", "{:.0f}"),
    ("p50 ms", "latency_ms_p50", "{:.1f}"),
    ("p99 ms", "latency_ms_p99", "{:.1f}"),
    ("dropped", "dropped", "{}"),
    ("rss MB", "rss_mb", "{:.0f}"),
)


def ratios(r: Result) -> dict:
    return {
        "e2e_over_ceiling": r.e2e_fps / r.ceiling if r.ceiling else None,
        "e2e_over_pvapy": r.e2e_fps / r.pvapy_fps if r.pvapy_fps else None,
        "passthrough_over_pvapy_client": (
            r.passthrough_fps / r.pvapy_client_fps if r.pvapy_client_fps else None
        ),
    }


def table(results: list[Result]) -> str:
    rows = []
    for r in results:
        d = {**asdict(r), **ratios(r)}
        d["e2e/min"], d["e2e/pvapy"] = d["e2e_over_ceiling"], d["e2e_over_pvapy"]
        row = []
        for title, key, fmt in COLUMNS:
            v = d[key or title]
            row.append("-" if v is None else fmt.format(v))
        rows.append(row)
    titles = [c[0] for c in COLUMNS]
    widths = [max(len(t), *(len(r[i]) for r in rows)) for i, t in enumerate(titles)]
    lines = ["  ".join(t.rjust(w) for t, w in zip(titles, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def run(
    out: Path,
    cfg: Config,
    cases: list[str] | None = None,
    seconds: float = 8.0,
    pvapy: bool = True,
    steady_minutes: float = 0.0,
    workers: bool = False,
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(out, cfg, seconds=seconds)
    chosen = [c for c in CASES if not cases or c.name in cases]
    unknown = set(cases or ()) - {c.name for c in CASES}
    if unknown:
        raise SystemExit(f"unknown case(s) {sorted(unknown)}; known: {[c.name for c in CASES]}")
    results: list[Result] = []
    report: dict = {"machine": _machine(), "backend": cfg.edge.backend, "cases": []}
    with Context("pva", nt=False) as ctx:
        for case in chosen:
            log.info("bench case %s", case.name)
            res = bench.case(ctx, case, pvapy=pvapy)
            results.append(res)
            report["cases"].append({**asdict(res), **ratios(res)})
            print(table(results).splitlines()[-1] if len(results) > 1 else table(results))
            (out / "bench.json").write_text(json.dumps(report, indent=1))
        if steady_minutes > 0:
            ref = next((r for r in results if r.case == "ptycho512"), results[0])
            case = next(c for c in CASES if c.name == ref.case)
            rate = STEADY_FRACTION * ref.e2e_fps
            log.info(
                "steady run: %s at %.0f frames/s for %.1f min", case.name, rate, steady_minutes
            )
            report["steady"] = bench.steady(ctx, case, rate, steady_minutes)
    print()
    print(table(results))
    if "steady" in report:
        s = report["steady"]
        print(
            f"\nsteady {s['case']}: {s['offered_fps']:.0f} frames/s for {s['minutes']} min: "
            f"{s['answered']} answered, {s['dropped']} dropped, latency p50 "
            f"{s['latency_ms_p50']:.1f} / p99 {s['latency_ms_p99']:.1f} ms; edge RSS "
            f"{s['rss_mb_start']:.0f} -> {s['rss_mb_end']:.0f} MB (growth after the first "
            f"minute {s['rss_growth_mb_after_1min']:.1f} MB, bound {s['rss_bound_mb']:.0f})"
        )
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out / 'bench.json'}")
    return report


def _machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
