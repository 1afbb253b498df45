"""``edgeloop demo``: start everything, scan with an untrained model, retrain through a PV
write as an operator would, scan again with the new model, stop, and report."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path

import numpy as np
from p4p.client.thread import Context

from edgeloop import ntnd
from edgeloop.config import MODE_KIND, Config, check_mode, pin_loopback
from edgeloop.optics import illuminated_mask
from edgeloop.processes import ManagedProcess, wait_for_pv

log = logging.getLogger(__name__)


class OutputCollector:
    """Every update of an edge output PV (pipelined monitor, so none are squashed), keyed by
    the input frame's uniqueId; here edge:Phase frames, subclasses parse other outputs."""

    def __init__(self, ctx: Context, pv: str):
        self.lock = threading.Lock()
        self.items: dict = {}
        self.sub = ctx.monitor(pv, self._on, request="field()record[pipeline=true,queueSize=64]")

    def _parse(self, value) -> tuple[int, object]:
        frame = ntnd.decode(value)
        return frame.unique_id, frame

    def _on(self, value) -> None:
        if isinstance(value, Exception):
            return
        uid, item = self._parse(value)
        if uid > 0:  # 0: the placeholder before the first frame
            with self.lock:
                self.items[uid] = item

    def take(self, expected, timeout: float) -> dict:
        """Wait for the outputs of the uniqueIds in ``expected`` (or for ``expected`` outputs
        when it is an int); return what arrived and start afresh."""
        def done() -> bool:
            if isinstance(expected, int):
                return len(self.items) >= expected
            return {int(u) for u in expected} <= set(self.items)

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if done():
                    break
            time.sleep(0.05)
        with self.lock:
            out, self.items = self.items, {}
        return out

    def close(self) -> None:
        self.sub.close()


def wait_drained(ctx: Context, prefix: str, settle_s: float = 1.0,
                 timeout: float = 60.0) -> int:
    """Wait until the edge has answered every frame it received and no more arrive."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        frames_in = ctx.get(f"{prefix}edge:FramesIn")["value"]
        frames_out = ctx.get(f"{prefix}edge:FramesOut")["value"]
        if frames_in == frames_out == last:
            return frames_in
        if time.monotonic() > deadline:
            raise TimeoutError(f"edge not drained: {frames_in} in, {frames_out} out")
        last = frames_in if frames_in == frames_out else None
        time.sleep(settle_s)


def phase_errors(outputs: dict[int, ntnd.Frame], sim) -> np.ndarray:
    """Per-frame mean |predicted - true| phase inside the illuminated region, after removing
    each frame's constant offset (the global phase of ptychography is not measurable)."""
    mask = illuminated_mask(sim.probe)
    errs = []
    for frame in outputs.values():
        truth = sim.true_phase(float(frame.attributes["SampleX"]),
                               float(frame.attributes["SampleY"]))
        d = (frame.data - truth)[mask]
        errs.append(np.abs(d - d.mean()).mean())
    return np.array(errs)


def _wait_retrained(ctx: Context, p: str, old_version: int, timeout: float) -> list[str]:
    states, last = [], None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = ctx.get(f"{p}ml:Status")
        state = status["value.choices"][status["value.index"]]
        if state != last:
            msg = ctx.get(f"{p}ml:Message")["value"]
            log.info("ml:Status %s  (%s)", state, msg)
            states.append(state)
            last = state
        if state == "Error":
            raise RuntimeError(f"retraining failed: {ctx.get(f'{p}ml:Message')['value']}")
        if state == "Idle" and ctx.get(f"{p}edge:ModelVersion")["value"] != old_version:
            return states
        time.sleep(0.2)
    raise TimeoutError(f"retraining did not finish within {timeout} s (states {states})")


def _scan(RE, det, stage, ctx: Context, collector: OutputCollector, cfg: Config, num: int,
          step: float, center: tuple[float, float]) -> tuple[float, dict, np.ndarray, int]:
    """One spiral scan: (seconds, edge outputs by uniqueId, stitched map, model version)."""
    from edgeloop.bluesky_plans import ptycho_scan

    p = cfg.prefix
    t0 = time.perf_counter()
    RE(ptycho_scan(det, stage, num=num, step=step, center=center))
    seconds = time.perf_counter() - t0
    outputs = collector.take(num, 60)
    time.sleep(cfg.edge.map_publish_s * 3)  # the map is published at most this often
    phase_map = ntnd.decode(ctx.get(f"{p}edge:PhaseMap")).data.copy()
    return seconds, outputs, phase_map, int(ctx.get(f"{p}edge:ModelVersion")["value"])


def _save_png(path: Path, sim, maps: list[tuple[str, np.ndarray]], cfg: Config,
              extent_um: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = cfg.edge.map_size
    half = int(extent_um / cfg.sim.pixel_um) + cfg.model.input_size // 2
    c = n // 2
    sl = np.s_[max(c - half, 0):c + half, max(c - half, 0):c + half]
    truth = np.angle(sim.obj)[sl]
    truth = truth - truth.mean()
    lo, hi = np.percentile(truth, [1, 99])
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(4 * (len(maps) + 1), 4.2))
    axes[0].imshow(truth, cmap="gray", vmin=lo, vmax=hi)
    axes[0].set_title("ground truth phase")
    for ax, (title, img) in zip(axes[1:], maps):
        crop = img[sl]
        seen = crop != 0
        offset = (crop[seen] - truth[seen]).mean() if seen.any() else 0.0
        ax.imshow(np.where(seen, crop - offset, np.nan), cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(title)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle("edgeloop: stitched phase map (edge:PhaseMap) vs simulation")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


class _System:
    """The three servers as subprocesses (ioc, edge, retrain-service), stopped by PID."""

    def __init__(self, cfg: Config, out: Path):
        self.cfg, self.out = cfg, out
        self.procs: list[ManagedProcess] = []
        self.ctx = Context("pva", nt=False)

    def __enter__(self) -> "_System":
        p, out = self.cfg.prefix, self.out
        common = ["--prefix", p, "--config", str(out / "config.json")]
        try:
            for name, ready in (("ioc", "ml:Status"), ("edge", "edge:ModelVersion"),
                                ("retrain-service", None)):
                proc = ManagedProcess(name, [name, *common], out / "logs" / f"{name}.log")
                self.procs.append(proc)
                if ready:
                    wait_for_pv(self.ctx, f"{p}{ready}", 60, proc)
            time.sleep(1.0)  # the service subscribes to ml:Retrain
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.ctx.close()
        for proc in reversed(self.procs):
            proc.stop()


def _prepare(cfg: Config, out: str | Path, epochs: int | None) -> Path:
    pin_loopback()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("data", "models"):
        shutil.rmtree(out / sub, ignore_errors=True)
    cfg.data_dir, cfg.registry_dir = str(out / "data"), str(out / "models")
    if epochs is not None:
        cfg.training(MODE_KIND[cfg.mode]).epochs = epochs
    cfg.dump(out / "config.json")
    return out


def burst(ctx: Context, p: str, frames: int, take) -> tuple[int, float]:
    """A free-running burst, as fast as the detector posts: (outputs seen, seconds)."""
    from caproto.sync.client import write as ca_put

    ca_put(f"{p}det:cam1:NumImages", frames, notify=True, repeater=False)
    t0 = time.perf_counter()
    ca_put(f"{p}det:cam1:Acquire", 1, notify=True, timeout=120, repeater=False)
    seen = len(take(frames, 120))
    return seen, time.perf_counter() - t0


def edge_stats(ctx: Context, cfg: Config) -> dict:
    wait_drained(ctx, cfg.prefix, settle_s=4 * cfg.edge.stats_publish_s)
    return {k: int(ctx.get(f"{cfg.prefix}edge:{k}")["value"]) for k in
            ("FramesIn", "FramesOut", "Dropped", "BadFrames")}


def run_demo(cfg: Config, out: str | Path, scan_points: int = 500, epochs: int | None = None,
             step: float = 0.05, mode: str | None = None) -> dict:
    """The whole loop once, for ``mode`` (default ``cfg.mode``): ptycho or hedm."""
    cfg.mode = check_mode(mode or cfg.mode)
    t_demo = time.perf_counter()
    out = _prepare(cfg, out, epochs)
    devices: list = []
    with _System(cfg, out) as system:
        try:
            from bluesky import RunEngine
            from edgeloop.bluesky_plans import ScanWriter, make_devices

            det, stage = make_devices(cfg.prefix)
            devices += [det, stage]
            RE = RunEngine({})
            writer = ScanWriter(cfg.data_path)
            RE.subscribe(writer)
            if cfg.mode == "hedm":
                from edgeloop.hedm_demo import hedm_demo, print_report
                report = hedm_demo(cfg, out, system.ctx, RE, writer, det, stage, scan_points)
            else:
                print_report = _print_report
                report = _ptycho_demo(cfg, out, system.ctx, RE, writer, det, stage,
                                      scan_points, step)
        finally:
            for device in devices:  # disconnect cleanly before the servers go away
                device.destroy()
    report["demo_s"] = time.perf_counter() - t_demo
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print_report(report, out)
    return report


def retrain_via_pv(ctx: Context, p: str, old_version: int) -> tuple[float, list[str]]:
    from caproto.sync.client import write as ca_put  # caput, as an operator would

    log.info("operator: caput %sml:Retrain 1", p)
    t0 = time.perf_counter()
    ca_put(f"{p}ml:Retrain", 1, notify=True, timeout=5, repeater=False)
    states = _wait_retrained(ctx, p, old_version, timeout=900)
    return time.perf_counter() - t0, states


def _ptycho_demo(cfg, out, ctx, RE, writer, det, stage, scan_points, step) -> dict:
    from edgeloop.ioc.physics import PtychoSimulator

    p = cfg.prefix
    sim = PtychoSimulator(cfg.sim)
    collector = OutputCollector(ctx, f"{p}edge:Phase")
    centers = [(0.0, 0.0), (0.2, -0.15)]  # the second scan overlaps the first in part

    log.info("scan 1: %d points with the untrained model", scan_points)
    dt1, out1, map1, v0 = _scan(RE, det, stage, ctx, collector, cfg, scan_points, step,
                                centers[0])
    retrain_s, states = retrain_via_pv(ctx, p, v0)
    log.info("scan 2: %d points with the retrained model", scan_points)
    dt2, out2, map2, v1 = _scan(RE, det, stage, ctx, collector, cfg, scan_points, step,
                                centers[1])
    seen, burst_s = burst(ctx, p, 300, collector.take)
    stats = edge_stats(ctx, cfg)
    err1, err2 = phase_errors(out1, sim), phase_errors(out2, sim)
    lat = np.array([f.attributes["LatencyMs"] for f in (*out1.values(), *out2.values())])
    extent = 0.55 * step * np.sqrt(scan_points) + max(abs(c) for xy in centers for c in xy)
    _save_png(out / "phase_map.png", sim,
              [(f"scan 1, model v{v0}", map1), (f"scan 2, model v{v1}", map2)], cfg, extent)
    return {
        "mode": "ptycho",
        "frames_in": stats["FramesIn"], "frames_out": stats["FramesOut"],
        "dropped": stats["Dropped"], "bad_frames": stats["BadFrames"],
        "fps": seen / burst_s,
        "scan_fps": (len(out1) + len(out2)) / (dt1 + dt2),
        "latency_ms_p50": float(np.percentile(lat, 50)),
        "latency_ms_p99": float(np.percentile(lat, 99)),
        "model_versions": [v0, v1],
        "phase_error_before": float(err1.mean()), "phase_error_after": float(err2.mean()),
        "phase_error_unit": "rad, mean |error| in the illuminated region",
        "scan_points": scan_points, "outputs_scan1": len(out1), "outputs_scan2": len(out2),
        "retrain_s": retrain_s, "retrain_states": states,
    }


def _print_report(r: dict, out: Path) -> None:
    lines = [
        "edgeloop demo report",
        f"  frames in / out / dropped   {r['frames_in']} / {r['frames_out']} / {r['dropped']}",
        f"  edge throughput (burst)     {r['fps']:.1f} frames/s   (during scans "
        f"{r['scan_fps']:.1f} frames/s, set by the scan)",
        f"  latency p50 / p99           {r['latency_ms_p50']:.1f} / "
        f"{r['latency_ms_p99']:.1f} ms",
        f"  model versions              {r['model_versions']}",
        f"  phase error before / after  {r['phase_error_before']:.3f} / "
        f"{r['phase_error_after']:.3f} rad",
        f"  retraining (PV write -> new model serving)  {r['retrain_s']:.0f} s",
        f"  report {out / 'report.json'}, picture {out / 'phase_map.png'}",
    ]
    print("\n".join(lines), flush=True)
