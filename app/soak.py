"""``edgeloop soak`` (app layer): the loop left running, as through a beamtime.

A frame source in this process streams simulated ptychography frames to the edge at a
fraction (default 80 %) of the edge's ceiling, measured first; one frame in ``bad_every``
is malformed (NaN pixels, a wrong size, an unknown Mode, a corrupt payload).  Meanwhile,
every ``retrain_every_s``, a spiral scan runs through the real RunEngine on the simulated
beamline (its frames written by the ScanWriter for training), retraining is started with a
write to ``ml:Retrain`` and the new model is hot-swapped into the edge.  At the end
``DIR/soak.json`` says what was sent, answered, dropped and refused, how many swaps, the
edge's and the retraining service's memory and open files and the registry's size on disk
at the start, after each cycle and at the end (retention keeps the registry bounded), the
training frames lost, and whether every frame is accounted for.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from p4p.server import Server
from p4p.server.thread import SharedPV

from edgeloop import ntnd
from edgeloop.app.loop import (
    Servers,
    edge_counts,
    prepare,
    retrain_via_pv,
    settled_counts,
    wait_drained,
)
from edgeloop.config import Config
from edgeloop.registry import Registry
from edgeloop.remote.retention import tree_bytes

log = logging.getLogger(__name__)

# the edge's resident memory may grow this much over a soak (caches, allocator pools)
RSS_GROWTH_BOUND_MB = 64.0


def _malformed(kind: int, frame: np.ndarray) -> object:
    """A frame the edge must refuse (uniqueId set by the caller)."""
    if kind == 0:
        bad = frame.astype(np.float32)
        bad[0, 0] = np.nan
        return ntnd.build(bad, 1)
    if kind == 1:
        value = ntnd.build(frame, 1)
        value["dimension"] = [{"size": frame.shape[1] + 1}, {"size": frame.shape[0]}]
        return value
    if kind == 2:
        return ntnd.build(frame, 1, {"Mode": "xrf"})
    value = ntnd.build(frame, 1, codec="lz4")
    value["value"] = ("ubyteValue", np.full(16, 0xFF, np.uint8))
    return value


class Stream:
    """Posts frames to the edge's input at a set rate in a thread of its own."""

    def __init__(self, pv: SharedPV, frames: list, positions: np.ndarray, bad_every: int):
        self.pv, self.frames, self.positions = pv, frames, positions
        self.bad_every = bad_every
        self.sent = self.malformed = 0
        self.rate = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _next(self):
        self.sent += 1
        i = self.sent % len(self.frames)
        if self.bad_every and self.sent % self.bad_every == 0:
            self.malformed += 1
            value = _malformed(self.malformed % 4, self.frames[i])
        else:
            x, y = self.positions[i]
            value = ntnd.build(self.frames[i], 1, {"SampleX": float(x), "SampleY": float(y)})
        value["uniqueId"] = self.sent
        return value

    def run_for(self, seconds: float, rate: float | None) -> None:
        """Post for ``seconds`` at ``rate`` frames/s (None: as fast as possible)."""
        end = time.monotonic() + seconds
        due = time.monotonic()
        while not self._stop.is_set() and time.monotonic() < end:
            self.pv.post(self._next())
            if rate:
                due += 1.0 / rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                elif delay < -1.0:
                    due = time.monotonic()  # fell behind by a second: do not burst

    def start(self, rate: float) -> None:
        self.rate = rate
        self._thread = threading.Thread(
            target=self.run_for, args=(float("inf"), rate), name="soak-stream", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


def _resources(proc: psutil.Process) -> tuple[float, int]:
    return proc.memory_info().rss / 2**20, proc.num_fds()


class Watch:
    """The edge's and the service's memory and open files, and the registry's size."""

    def __init__(self, system, registry: Path):
        names = {"edge": "edge", "service": "retrain-service"}
        self.procs = {key: psutil.Process(system.procs[n].proc.pid) for key, n in names.items()}
        self.registry = registry

    def sample(self) -> dict:
        figures = {"registry_mb": round(tree_bytes(self.registry) / 1e6, 1)}
        for name, proc in self.procs.items():
            rss, fds = _resources(proc)
            figures[f"{name}_rss_mb"], figures[f"{name}_fds"] = round(rss, 1), fds
        return figures


def _scan(cfg: Config, RE, det, stage, index, points: int, center) -> int:
    """One spiral scan; the frames the detector's file lacks (training frames lost)."""
    from edgeloop.bluesky_plans import ptycho_scan
    from edgeloop.scanfile import read_scan

    RE(ptycho_scan(det, stage, num=points, step=0.05, center=center))
    written = len(read_scan(index.last_path)["frames"])
    return points - written


def _ceiling(stream: Stream, ctx, p: str) -> float:
    """The edge's answers per second with frames posted as fast as it takes them (after a
    warm-up)."""
    stream.run_for(3.0, None)
    wait_drained(ctx, p, settle_s=0.5)
    out0, t0 = edge_counts(ctx, p)["FramesOut"], time.monotonic()
    stream.run_for(8.0, None)
    wait_drained(ctx, p, settle_s=0.5)
    return (edge_counts(ctx, p)["FramesOut"] - out0) / (time.monotonic() - t0)


def _cycles(
    cfg: Config, ctx, minutes: float, retrain_every_s: float, points: int, watch: Watch
) -> dict:
    """Scans through the real RunEngine, each followed by retraining through ml:Retrain and a
    swap, every ``retrain_every_s`` for ``minutes``; ``watch`` sampled after each."""
    from bluesky import RunEngine

    from edgeloop.app.signals import AbortOnSignal
    from edgeloop.bluesky_plans import RunIndex, make_devices

    p = cfg.prefix
    det, stage = make_devices(p, cfg.data_path / "detector")
    RE = RunEngine({}, context_managers=[AbortOnSignal])
    index = RunIndex(cfg.data_path, cfg.positions)
    RE.subscribe(index)
    done: dict = {"swaps": 0, "lost": 0, "cycles": [], "errors": []}
    deadline = time.monotonic() + minutes * 60
    try:
        while time.monotonic() < deadline:
            t_cycle, n = time.monotonic(), len(done["cycles"])
            center = (0.1 * (n % 5), -0.1 * (n % 3))
            done["lost"] += _scan(cfg, RE, det, stage, index, points, center)
            version = int(ctx.get(f"{p}edge:ModelVersion")["value"])
            try:
                seconds, _ = retrain_via_pv(ctx, p, version, protocol="pva")
                done["swaps"] += 1
                version = int(ctx.get(f"{p}edge:ModelVersion")["value"])
                cycle = {"retrain_s": round(seconds, 1), "version": version}
                done["cycles"].append(dict(cycle, **watch.sample()))
            except (RuntimeError, TimeoutError) as exc:  # reported, and the soak goes on
                done["errors"].append(str(exc))
                log.error("retraining during the soak: %s", exc)
            rest = retrain_every_s - (time.monotonic() - t_cycle)
            time.sleep(max(0.0, min(rest, deadline - time.monotonic())))  # the cycle's pace
    finally:
        det.destroy()
        stage.destroy()
    return done


def run_soak(
    cfg: Config,
    out: str | Path,
    minutes: float,
    fraction: float = 0.8,
    retrain_every_s: float = 240.0,
    bad_every: int = 50,
    scan_points: int = 150,
) -> dict:
    from edgeloop.bluesky_plans import spiral_positions
    from edgeloop.ioc.physics import PtychoSimulator

    cfg.train.epochs = min(cfg.train.epochs, 8)  # a retraining every few minutes on 2 cores
    cfg.tiled.enabled = False  # runs as run entries: the soak's subject is the frame path
    cfg.train.recon_epochs = min(cfg.train.recon_epochs, 10)
    out = prepare(cfg, out, None)
    p = cfg.prefix
    source_name = f"{p}soak:Image"
    sim = PtychoSimulator(cfg.sim)
    positions = spiral_positions(200, 0.05)
    frames = [sim.frame(float(x), float(y)).astype(np.uint16) for x, y in positions]
    source = SharedPV(initial=ntnd.build(np.zeros_like(frames[0]), 0))
    with (
        Server(providers=[{source_name: source}]),
        Servers(
            cfg, out / "config.json", out / "logs", edge_args=("--input-pv", source_name)
        ) as system,
    ):
        ctx = system.ctx
        watch = Watch(system, cfg.registry_path)
        stream = Stream(source, frames, positions, bad_every)
        ceiling = _ceiling(stream, ctx, p)
        log.info("edge ceiling %.0f frames/s; streaming at %.0f", ceiling, fraction * ceiling)
        before = _snapshot(edge_counts(ctx, p), stream, watch)
        stream.start(fraction * ceiling)
        try:
            done = _cycles(cfg, ctx, minutes, retrain_every_s, scan_points, watch)
        finally:
            stream.stop()
        end = settled_counts(ctx, p, quiet_s=2 * cfg.edge.stats_publish_s + 0.5, timeout=120)
        after = _snapshot(end, stream, watch)
    registry = Registry(cfg.registry_path)
    done["pruned"] = sum(bool(registry.meta(v).get("pruned")) for v in registry.versions())
    report = _report(minutes, fraction, ceiling, stream.rate, before, after, done)
    (out / "soak.json").write_text(json.dumps(report, indent=2))
    print_report(report, out)
    return report


def _snapshot(counts: dict, stream: Stream, watch: Watch) -> dict:
    return {"counts": counts, "sent": stream.sent, "malformed": stream.malformed, **watch.sample()}


def _report(
    minutes: float,
    fraction: float,
    ceiling: float,
    rate: float,
    before: dict,
    after: dict,
    done: dict,
) -> dict:
    """soak.json: the frames counted at the edge between the start and the settled end,
    the retraining cycles, and the edge's resources before and after."""
    start, end = before["counts"], after["counts"]
    rss0, fds0 = before["edge_rss_mb"], before["edge_fds"]
    rss1, fds1 = after["edge_rss_mb"], after["edge_fds"]
    taken = {k: end[k] - start[k] for k in end}
    sent = after["sent"] - before["sent"]
    report = {
        "minutes": minutes,
        "fraction_of_ceiling": fraction,
        "ceiling_fps": round(ceiling, 1),
        "rate_fps": round(rate, 1),
        "frames_sent": sent,
        "frames_in": taken["FramesIn"],
        "frames_out": taken["FramesOut"],
        "dropped": taken["Dropped"],
        "rejected": taken["BadFrames"],
        "malformed_sent": after["malformed"] - before["malformed"],
        "missed": taken["MissedFrames"],
        "swaps": done["swaps"],
        "retrain_errors": done["errors"],
        "cycles": done["cycles"],
        "rss_mb_start": round(rss0, 1),
        "rss_mb_end": round(rss1, 1),
        "rss_growth_bound_mb": RSS_GROWTH_BOUND_MB,
        "open_fds_start": fds0,
        "open_fds_end": fds1,
        "service_rss_mb_start": before["service_rss_mb"],
        "service_rss_mb_end": after["service_rss_mb"],
        "service_fds_start": before["service_fds"],
        "service_fds_end": after["service_fds"],
        "registry_mb_start": before["registry_mb"],
        "registry_mb_end": after["registry_mb"],
        "versions_pruned": done["pruned"],
        "lost_training_frames": done["lost"],
        # every frame the edge took in is settled, and every frame sent was taken in,
        # refused as a repeat, or counted missed by its uniqueId
        "conserved": end["FramesIn"] == end["FramesOut"] + end["Dropped"] + end["BadFrames"]
        and end["InFlight"] == 0
        and sent == taken["FramesIn"] + taken["MissedFrames"] + taken["Repeats"],
    }
    report["within_bounds"] = (
        rss1 - rss0 <= RSS_GROWTH_BOUND_MB and fds1 <= fds0 + 8 and report["conserved"]
    )
    return report


def print_report(r: dict, out: Path) -> None:
    lines = [
        f"edgeloop soak, {r['minutes']} min at {r['rate_fps']} frames/s "
        f"({r['fraction_of_ceiling']:.0%} of the {r['ceiling_fps']} frames/s ceiling)",
        f"  frames sent / in / out       {r['frames_sent']} / {r['frames_in']} / "
        f"{r['frames_out']}",
        f"  dropped / rejected / missed  {r['dropped']} / {r['rejected']} "
        f"(of {r['malformed_sent']} malformed) / {r['missed']}",
        f"  swaps                        {r['swaps']}  ({len(r['retrain_errors'])} failed)",
        f"  edge RSS                     {r['rss_mb_start']} -> {r['rss_mb_end']} MB "
        f"(bound +{r['rss_growth_bound_mb']:.0f} MB)",
        f"  edge open files              {r['open_fds_start']} -> {r['open_fds_end']}",
        f"  service RSS, open files      {r['service_rss_mb_start']} -> "
        f"{r['service_rss_mb_end']} MB, {r['service_fds_start']} -> {r['service_fds_end']}",
        f"  registry on disk             {r['registry_mb_start']} -> {r['registry_mb_end']} MB "
        f"({r['versions_pruned']} versions pruned by retention)",
        f"  training frames lost         {r['lost_training_frames']}",
        f"  every frame accounted for    {r['conserved']}",
        f"  report {out / 'soak.json'}",
    ]
    print("\n".join(lines), flush=True)
