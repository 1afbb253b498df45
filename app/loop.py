"""What every demo does with the running loop (app layer): start the three servers, collect
the edge's outputs by frame, burst frames, read the edge's counters once they settle and
add up, and retrain through a PV write as an operator would."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
from p4p.client.thread import Context

from edgeloop import ntnd, signing
from edgeloop.app.processes import ManagedProcess, readiness, wait_for_pv
from edgeloop.config import MODE_KIND, Config, pin_loopback
from edgeloop.waiting import wait_settled, wait_until

log = logging.getLogger(__name__)


EDGE_COUNTERS = ("FramesIn", "FramesOut", "Dropped", "BadFrames", "InFlight")


def edge_counts(ctx: Context, prefix: str, edge: str = "edge:") -> dict[str, int]:
    """The edge's frame counters, MissedFrames and Repeats, each read from its PV."""
    names = (*EDGE_COUNTERS, "MissedFrames", "Repeats")
    return {n: int(ctx.get(f"{prefix}{edge}{n}", timeout=5)["value"]) for n in names}


def settled_counts(
    ctx: Context,
    prefix: str,
    done=lambda counts: counts["InFlight"] == 0,
    quiet_s: float = 1.0,
    timeout: float = 60.0,
    edge: str = "edge:",
) -> dict[str, int]:
    """``edge_counts`` once they add up (FramesIn = FramesOut + Dropped + BadFrames +
    InFlight), ``done`` holds for them (by default: nothing in flight) and none moved for
    ``quiet_s``. Each counter is its own PV, posted one after another every
    ``edge.stats_publish_s``: a reading taken across two posts may not add up, a settled one
    does, so ``quiet_s`` should span two posts."""

    def ready(c: dict) -> bool:
        in_ = c["FramesOut"] + c["Dropped"] + c["BadFrames"] + c["InFlight"]
        return c["FramesIn"] == in_ and done(c)

    what = f"the counters of {prefix}{edge} to settle"
    return wait_settled(lambda: edge_counts(ctx, prefix, edge), ready, quiet_s, timeout, what)


def wait_drained(ctx: Context, prefix: str, settle_s: float = 1.0, timeout: float = 60.0) -> int:
    """Wait until the edge has settled every frame it received (answered, dropped or
    refused: nothing in flight) and no more arrive; returns FramesIn."""
    return settled_counts(ctx, prefix, quiet_s=settle_s, timeout=timeout)["FramesIn"]


def stitched_map(
    ctx: Context, prefix: str, frames: int, since: float, timeout: float = 15.0
) -> np.ndarray:
    """``edge:PhaseMap`` once it holds ``frames`` answers and was posted after ``since`` (the
    scan's start, wall clock): its uniqueId counts the answers placed since the acquisition
    began, and the edge posts it at most every ``edge.map_publish_s``, so the map posted
    last may be incomplete or the previous scan's.  After ``timeout``, the map as it is,
    with a warning."""
    name = f"{prefix}edge:PhaseMap"

    def full():
        value = ctx.get(name)
        posted = ntnd.epoch_seconds(value)
        return value if posted >= since and value["uniqueId"] >= frames else None

    try:
        value = wait_until(full, timeout, f"{name} to hold {frames} answers", 0.1)
    except TimeoutError as exc:
        log.warning("%s; taking the map as it is", exc)
        value = ctx.get(name)
    return ntnd.decode(value).data.copy()


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


class Servers:
    """edgeloop servers as subprocesses, each ready once its PV answers (the retraining
    service: once it beats, processes.readiness), stopped by PID in reverse order.  As a
    context manager: the loop (ioc, edge with ``edge_args``, retrain-service), after the
    embedded Tiled server where ``[tiled]`` asks for it."""

    LOOP = (("ioc", "ml:Status"), ("edge", "edge:ModelVersion"), ("retrain-service", None))

    def __init__(
        self,
        cfg: Config,
        config_path: Path,
        logs: Path,
        env: dict | None = None,
        edge_args: tuple[str, ...] = (),
    ):
        self.cfg, self.config_path, self.logs = cfg, Path(config_path), Path(logs)
        self.prefix = cfg.prefix
        self.env = env
        self.loop_args = {"ioc": ("--simulate",), "edge": edge_args}
        self.procs: dict[str, ManagedProcess] = {}
        self.ctx = Context("pva", nt=False)

    def start(
        self, name: str, *extra: str, ready_pv: str | None = None, timeout: float = 90.0
    ) -> ManagedProcess:
        """``edgeloop <name>`` with the prefix and the configuration, once ready."""
        args = [name, "--prefix", self.prefix, "--config", str(self.config_path), *extra]
        pv, until = readiness(self.ctx, self.prefix, name, ready_pv)
        proc = ManagedProcess(name, args, self.logs / f"{name}.log", env=self.env)
        self.procs[name] = proc
        wait_for_pv(self.ctx, pv, timeout, proc, until)
        return proc

    def start_tiled(self) -> ManagedProcess:
        """The embedded Tiled server (``edgeloop tiled``), once it answers."""
        from edgeloop.app.tiled_server import wait_ready

        args = ["tiled", "--prefix", self.prefix, "--config", str(self.config_path)]
        proc = ManagedProcess("tiled", args, self.logs / "tiled.log", env=self.env)
        self.procs["tiled"] = proc
        wait_ready(self.cfg, proc=proc)
        return proc

    def __enter__(self) -> Servers:
        try:
            if self.cfg.tiled.enabled and not self.cfg.tiled.uri:
                self.start_tiled()
            for name, ready in self.LOOP:
                self.start(name, *self.loop_args.get(name, ()), ready_pv=ready)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def outputs(self) -> str:
        """The tail of each server's log, for a failure's message."""
        return "\n".join(f"----- {n} -----\n{p.output()[-4000:]}" for n, p in self.procs.items())

    def stop(self) -> None:
        self.ctx.close()
        for proc in reversed(list(self.procs.values())):
            proc.stop()


# written first into a demo's output folder: only a folder holding it is emptied by a demo
DEMO_MARKER = ".edgeloop-demo"


def prepare(cfg: Config, out: str | Path, epochs: int | None) -> Path:
    """Make ``out`` the demo's folder: a new or empty one, or one an earlier demo made (its
    marker file), whose ``data`` and ``models`` (the earlier demo's) are removed; any other
    folder is refused, so a demo never deletes what it did not write."""
    pin_loopback(force=True)  # the demo starts every server: all its traffic stays here
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    marker = out / DEMO_MARKER
    if not marker.is_file():
        if any(out.iterdir()):
            raise FileExistsError(
                f"{out} is not empty and no edgeloop demo made it (no {DEMO_MARKER}): "
                "give --out a new or empty folder"
            )
        marker.write_text("written by edgeloop demo: data/ and models/ are replaced each run\n")
    for sub in ("data", "models"):
        shutil.rmtree(out / sub, ignore_errors=True)
    cfg.data_dir, cfg.registry_dir = str(out / "data"), str(out / "models")
    # the demo's own signing key, shared by its service and its (local) training endpoint
    cfg.security.signing_key_file = str(out / "signing.key")
    if not (out / "signing.key").exists():
        signing.create_key(out / "signing.key")
    if epochs is not None:
        cfg.training(MODE_KIND[cfg.mode]).epochs = epochs
    cfg.dump(out / "config.json")
    return out


def set_codec(p: str, codec: str) -> None:
    """Compress the detector's frames with ``codec``, as an operator sets NDPluginCodec."""
    from caproto.sync.client import write as ca_put

    log.info("operator: %sdet:Codec1 Compressor %s, EnableCallbacks Enable", p, codec)
    from edgeloop.ioc.beamline import Codec

    ca_put(f"{p}det:Codec1:Compressor", Codec.COMPRESSORS[codec], notify=True, repeater=False)
    ca_put(f"{p}det:Codec1:EnableCallbacks", "Enable", notify=True, repeater=False)


def burst(ctx: Context, p: str, frames: int, take) -> tuple[int, float]:
    """A free-running burst, as fast as the detector posts: (outputs seen, seconds)."""
    from caproto.sync.client import write as ca_put

    ca_put(f"{p}det:cam1:NumImages", frames, notify=True, repeater=False)
    t0 = time.perf_counter()
    ca_put(f"{p}det:cam1:Acquire", 1, notify=True, timeout=120, repeater=False)
    seen = len(take(frames, 120))
    return seen, time.perf_counter() - t0


def fly_figures(offered: int, scans: list[list[tuple[float, float]]], rate_hz: float) -> dict:
    """What the edge made of fly scans at ``rate_hz``: ``scans`` holds, per scan and per
    answered frame, its exposure time (latched by its trigger) and the time its answer
    reached a client.  Offered, answered, not answered, the latency p50/p99 in ms, and the
    rate the answers came at within the scans (frames/s)."""
    groups = [np.asarray(s, float).reshape(-1, 2) for s in scans]
    t = np.concatenate(groups) if groups else np.zeros((0, 2))
    lat = (t[:, 1] - t[:, 0]) * 1e3
    spans = [(len(g) - 1, np.ptp(g[:, 1])) for g in groups if len(g) > 1]
    span = sum(s for _, s in spans)
    return {
        "rate_hz": rate_hz,
        "frames_offered": offered,
        "frames_answered": len(t),
        "frames_unanswered": offered - len(t),
        "exposure_to_answer_ms_p50": float(np.percentile(lat, 50)) if len(t) else None,
        "exposure_to_answer_ms_p99": float(np.percentile(lat, 99)) if len(t) else None,
        "answers_per_s": sum(n for n, _ in spans) / span if span > 0 else None,
    }


def fly_line(fly: dict) -> str:
    """The report line of :func:`fly_figures`."""
    line = (
        f"  fly scans at {fly['rate_hz']:g} Hz        {fly['frames_offered']} frames offered, "
        f"{fly['frames_answered']} answered, {fly['frames_unanswered']} not"
    )
    if fly["frames_answered"]:
        line += (
            f"; exposure -> answer p50 {fly['exposure_to_answer_ms_p50']:.1f} / "
            f"p99 {fly['exposure_to_answer_ms_p99']:.1f} ms"
        )
    if fly["answers_per_s"]:
        line += f"; answers at {fly['answers_per_s']:.0f}/s"
    return line


def edge_stats(ctx: Context, cfg: Config) -> dict:
    wait_drained(ctx, cfg.prefix, settle_s=4 * cfg.edge.stats_publish_s)
    return {
        k: int(ctx.get(f"{cfg.prefix}edge:{k}")["value"])
        for k in ("FramesIn", "FramesOut", "Dropped", "BadFrames")
    }


def retrain_via_pv(
    ctx: Context, p: str, old_version: int, protocol: str = "ca"
) -> tuple[float, list[str]]:
    """Write 1 to ml:Retrain, over CA as an operator's caput would (or PVA), and wait for
    the new model to serve: (seconds, the ml:Status states seen)."""
    log.info("operator: put %sml:Retrain 1 (%s)", p, protocol)
    t0 = time.perf_counter()
    if protocol == "ca":
        from caproto.sync.client import write as ca_put

        ca_put(f"{p}ml:Retrain", 1, notify=True, timeout=5, repeater=False)
    else:
        ctx.put(f"{p}ml:Retrain", 1, timeout=5)
    states = _wait_retrained(ctx, p, old_version, timeout=900)
    return time.perf_counter() - t0, states
