"""Operator screens (app layer): Phoebus Display Builder files generated with phoebusgen,
what they name, and a picture of a screen drawn from the live PVs.

``overview.bob``: the edge's live phase image and stitched map (``pva://``), the peak
table, the frame statistics, the model, the training state with its time breakdown and the
Retrain / Abort / Rollback buttons.  ``beamline.bob``: the stage motors, the detector's
mode and controls, and its codec.  ``$(P)`` is the prefix macro; the layout follows ADCore's
``ADApp/op/bob`` screens (a title bar, labelled sections, readbacks beside controls); the
status PVs get alarm-sensitive borders (Phoebus shows no alarm on an NTTable, so severities
live on the scalars)."""

from __future__ import annotations

import functools
import inspect
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from p4p.client.thread import Context
from phoebusgen import colors, fonts, screen, widget
from phoebusgen.widget import properties as phoebus_properties
from phoebusgen.widget import widgets as phoebus_widgets

ROW = 26  # px per line of readbacks
SETTINGS = """\
# Phoebus settings for the simulated beamline on this host (phoebus -settings this_file):
# Channel Access searches the ML IOC (5064) and the simulated beamline (5066), pvAccess
# searches loopback; nothing is broadcast elsewhere.
org.phoebus.pv.ca/addr_list=127.0.0.1 127.0.0.1:5066
org.phoebus.pv.ca/auto_addr_list=false
org.phoebus.pv.pva/epics_pva_addr_list=127.0.0.1
org.phoebus.pv.pva/epics_pva_auto_addr_list=false
"""


def _rectangle(element) -> tuple[str, tuple[int, ...]]:
    """A widget's name and (x, y, width, height)."""
    keys = ("x", "y", "width", "height")
    return element.findtext("name"), tuple(int(element.findtext(k)) for k in keys)


def _overlap(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def layout_problems(path: Path) -> list[str]:
    """Widgets of a .bob that overlap another or lie outside the display."""
    root = ET.parse(path).getroot()
    size = int(root.findtext("width")), int(root.findtext("height"))
    placed = [_rectangle(w) for w in root.iter("widget")]
    problems = [
        f"{a} overlaps {b}"
        for i, (a, ra) in enumerate(placed)
        for b, rb in placed[i + 1 :]
        if _overlap(ra, rb)
    ]
    for name, (x, y, width, height) in placed:
        if x < 0 or y < 0 or x + width > size[0] or y + height > size[1]:
            problems.append(f"{name} lies outside the {size} display")
    return problems


class _Layout:
    """Places widgets on a phoebusgen screen, section by section."""

    def __init__(self, title: str, width: int, height: int):
        self.screen = screen.Screen(title)
        self.screen.width(width)
        self.screen.height(height)
        self.screen.macro("P", "SIM:")
        self.size = (width, height)
        self._n = 0
        self._placed: list[tuple[str, tuple[int, int, int, int]]] = []
        bar = widget.Label("title", title, 0, 0, width, 36)
        bar.predefined_font(fonts.Header1)
        bar.predefined_background_color(colors.Header_Background)
        bar.transparent(False)
        bar.horizontal_alignment_center()
        self.add(bar)

    def add(self, w) -> None:
        """Place ``w``; a widget that would overlap another or leave the display is refused."""
        name, rect = _rectangle(w.root)
        x, y, width, height = rect
        if x < 0 or y < 0 or x + width > self.size[0] or y + height > self.size[1]:
            raise ValueError(f"{name} at {rect} lies outside the {self.size} display")
        for other, placed in self._placed:
            if _overlap(rect, placed):
                raise ValueError(f"{name} at {rect} overlaps {other} at {placed}")
        self._placed.append((name, rect))
        self.screen.add_widget(w)

    def _name(self, kind: str) -> str:
        self._n += 1
        return f"{kind}{self._n}"

    def section(self, text: str, x: int, y: int, width: int) -> None:
        label = widget.Label(self._name("section"), text, x, y, width, 24)
        label.predefined_font(fonts.Header3)
        self.add(label)

    def label(self, text: str, x: int, y: int, width: int = 150) -> None:
        self.add(widget.Label(self._name("label"), text, x, y, width, ROW - 4))

    def readback(self, pv: str, x: int, y: int, width: int = 160) -> None:
        w = widget.TextUpdate(self._name("readback"), pv, x, y, width, ROW - 4)
        w.show_units(True)
        w.alarm_border(True)
        w.predefined_background_color(colors.Read_Background)
        w.transparent(False)
        self.add(w)

    def rows(self, x: int, y: int, rows: list[tuple[str, str]], width: int = 160) -> int:
        """Label + readback per row; returns the y below them."""
        for text, pv in rows:
            self.label(text, x, y)
            self.readback(pv, x + 155, y, width)
            y += ROW
        return y

    def entry(self, pv: str, x: int, y: int, width: int = 100) -> None:
        w = widget.TextEntry(self._name("entry"), pv, x, y, width, ROW - 4)
        w.show_units(True)
        w.alarm_border(True)
        self.add(w)

    def combo(self, pv: str, x: int, y: int, width: int = 120) -> None:
        w = widget.ComboBox(self._name("combo"), pv, x, y, width, ROW - 4)
        w.items_from_pv(True)
        self.add(w)

    def button(self, text: str, pv: str, value, x: int, y: int, width: int = 110) -> None:
        w = widget.ActionButton(self._name("button"), text, pv, x, y, width, 30)
        w.action_write_pv(pv, value, text)
        self.add(w)

    def image(self, pv: str, x: int, y: int, size: int) -> None:
        w = widget.Image(self._name("image"), pv, x, y, size, size)
        w.show_toolbar(False)
        w.alarm_border(True)
        self.add(w)


EDGE, ML = "pva://$(P)edge:", "$(P)ml:"


def overview() -> screen.Screen:
    """The operator's screen: the edge's images and peaks, its statistics, the retraining
    service and its policy, the buttons and the last retraining's times."""
    lay = _Layout("edgeloop $(P)", 1500, 900)
    _answers_block(lay)
    edge_bottom = _edge_block(lay, 870, 50)
    _retraining_block(lay, 1200, 80)
    _training_block(lay, 870, edge_bottom + 14)
    return lay.screen


def _answers_block(lay: _Layout) -> None:
    lay.section("Live phase (edge:Phase)", 20, 50, 320)
    lay.image(f"{EDGE}Phase", 20, 80, 320)
    lay.section("Stitched phase map (edge:PhaseMap)", 360, 50, 480)
    lay.image(f"{EDGE}PhaseMap", 360, 80, 480)
    lay.section("Bragg peaks (edge:Peaks)", 20, 580, 500)
    table = widget.Table("peaks", f"{EDGE}Peaks", 20, 610, 820, 270)
    table.show_toolbar(False)
    lay.add(table)
    lay.rows(560, 580, [("Peaks in last frame", f"{EDGE}PeakCount")], width=120)


def _edge_block(lay: _Layout, x: int, y: int) -> int:
    """The edge server's statistics and message; returns the block's bottom."""
    lay.section("Edge server", x, y, 600)
    y = lay.rows(
        x,
        y + 30,
        [
            ("Mode", f"{EDGE}Mode"),
            ("Model version", f"{EDGE}ModelVersion"),
            ("Frame rate", f"{EDGE}FrameRate"),
            ("Latency (median)", f"{EDGE}LatencyMs"),
            ("Frames in", f"{EDGE}FramesIn"),
            ("Frames out", f"{EDGE}FramesOut"),
            ("Dropped", f"{EDGE}Dropped"),
            ("Dropped rate", f"{EDGE}DroppedRate"),
            ("Bad frames", f"{EDGE}BadFrames"),
            ("Missed frames", f"{EDGE}MissedFrames"),
            ("Repeats", f"{EDGE}Repeats"),
            ("In flight", f"{EDGE}InFlight"),
            ("Thread restarts", f"{EDGE}Restarts"),  # MAJOR from the first
            ("Consistency (frame)", f"{EDGE}Consistency"),  # label-free quality, rad
            ("Consistency (scan)", f"{EDGE}ScanConsistency"),
        ],
    )
    lay.label("Message", x, y)
    lay.readback(f"{EDGE}Message", x + 155, y, 450)
    return y + ROW


def _retraining_block(lay: _Layout, x: int, y: int) -> None:
    """The service's state, and the retraining policy's settings with the live reference."""
    lay.section("Retraining", x, y, 280)
    lay.rows(
        x - 10,
        y + 30,
        [
            ("Status", f"{ML}Status"),
            ("Model version", f"{ML}ModelVersion"),
            ("Validation loss", f"{ML}ValLoss"),
            ("Service", f"{ML}Service"),  # MAJOR "No heartbeat" when the service is gone
            ("Disk free", f"{ML}DiskFree"),  # MINOR / MAJOR as the data disk fills
        ],
        width=130,
    )
    lay.label("Progress", x - 10, y + 30 + 5 * ROW)
    bar = widget.ProgressBar("progress", f"{ML}Progress", x + 145, y + 30 + 5 * ROW, 130, 20)
    lay.add(bar)
    # the retraining policy (remote/policy.py): its settings, and the live reference error
    lay.section("Retraining policy", x, y + 30 + 6 * ROW + 10, 280)
    y += 30 + 7 * ROW + 16
    for i, (text, pv) in enumerate(
        (
            ("Auto retrain", "AutoRetrain"),  # Off / On
            ("Threshold (ptycho)", "AutoThreshold"),  # edge:ScanConsistency above: retrain
            ("Threshold (HEDM)", "AutoThresholdPx"),
            ("Min interval", "AutoMinInterval"),
            ("Min new frames", "AutoMinFrames"),
        )
    ):
        lay.label(text, x - 10, y + i * ROW, 130)
        lay.entry(f"{ML}{pv}", x + 145, y + i * ROW, 130)
    lay.rows(x - 10, y + 5 * ROW, [("Reference error", f"{ML}ReferenceError")], width=130)


def _training_block(lay: _Layout, x: int, y: int) -> None:
    """The service's message, executor, buttons and the last retraining's times."""
    lay.section("Training", x, y, 600)
    lay.label("Message", x, y + 30)
    # an lsi record: over CA a plain name gives 40 characters, pva:// gives it whole
    lay.readback(f"pva://{ML}Message", x + 155, y + 30, 450)
    lay.label("Executor", x, y + 30 + ROW)
    lay.readback(f"{ML}Endpoint", x + 155, y + 30 + ROW, 160)
    lay.entry(f"{ML}Endpoint", x + 330, y + 30 + ROW, 140)
    for i, (text, pv) in enumerate(
        (("Retrain", "Retrain"), ("Abort", "Abort"), ("Rollback", "Rollback"))
    ):
        lay.button(text, f"{ML}{pv}", 1, x + 155 + i * 120, y + 40 + 2 * ROW)
    lay.section("Time of the last retraining", x, y + 90 + 2 * ROW, 600)
    lay.rows(
        x,
        y + 120 + 2 * ROW,
        [
            ("Staging", f"{ML}StagingTime"),
            ("Analysis (labels)", f"{ML}AnalysisTime"),
            ("Training", f"{ML}TrainingTime"),
            ("Return + deploy", f"{ML}ReturnTime"),
            ("End to end", f"{ML}EndToEndTime"),
        ],
    )
    lay.label("Triggered by", x, y + 120 + 7 * ROW)
    lay.readback(f"pva://{ML}Trigger", x + 155, y + 120 + 7 * ROW, 450)


def beamline() -> screen.Screen:
    lay = _Layout("edgeloop beamline $(P)", 1100, 620)
    lay.section("Sample stage", 20, 50, 500)
    y = 80
    for axis in ("SampleX", "SampleY", "SampleRot"):
        lay.label(axis, 20, y)
        lay.readback(f"$(P){axis}.RBV", 175, y, 140)
        lay.entry(f"$(P){axis}.VAL", 325, y, 120)
        y += ROW
    cam = "$(P)det:cam1:"
    lay.section("Detector (det:cam1)", 20, 180, 500)
    lay.label("Mode", 20, 210)
    lay.combo(f"{cam}Mode", 175, 210)
    lay.readback(f"{cam}Mode", 325, 210, 120)
    y = 210 + ROW
    for text, name in (("Acquire time", "AcquireTime"), ("Images", "NumImages")):
        lay.label(text, 20, y)
        lay.readback(f"{cam}{name}", 175, y, 140)
        lay.entry(f"{cam}{name}", 325, y, 120)
        y += ROW
    y = lay.rows(
        20,
        y,
        [
            ("Acquiring", f"{cam}Acquire_RBV"),
            ("Image counter", f"{cam}ArrayCounter_RBV"),
            ("Size X", f"{cam}ArraySizeX_RBV"),
            ("Size Y", f"{cam}ArraySizeY_RBV"),
        ],
        width=140,
    )
    lay.label("Status", 20, y)
    lay.readback(f"{cam}StatusMessage_RBV", 175, y, 340)
    lay.button("Start", f"{cam}Acquire", 1, 175, y + ROW + 6)
    lay.button("Stop", f"{cam}Acquire", 0, 295, y + ROW + 6)
    codec = "$(P)det:Codec1:"
    lay.section("Compression (det:Codec1)", 20, 520, 500)
    lay.label("Callbacks", 20, 550)
    lay.combo(f"{codec}EnableCallbacks", 175, 550)
    lay.label("Compressor", 20, 550 + ROW)
    lay.combo(f"{codec}Compressor", 175, 550 + ROW)
    lay.readback(f"{codec}CompFactor_RBV", 325, 550 + ROW, 120)
    lay.section("Frames (det:Pva1:Image; Phoebus decodes lz4 only)", 560, 50, 520)
    lay.image("pva://$(P)det:Pva1:Image", 560, 80, 500)
    return lay.screen


SCREENS = {"overview": overview, "beamline": beamline}


def write(out: Path) -> list[Path]:
    """Write every screen and the Phoebus settings file into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, build in SCREENS.items():
        path = out / f"{name}.bob"
        build().write_screen(str(path))
        paths.append(path)
    (out / "phoebus_settings.ini").write_text(SETTINGS)
    return paths


# ---- what a .bob names, and what Phoebus knows ---------------------------------------------


def pv_names(path: Path, prefix: str) -> set[str]:
    """Every PV a screen names (widgets and write actions), with ``$(P)`` set to ``prefix``
    and the ``pva://`` / ``ca://`` scheme kept."""
    root = ET.parse(path).getroot()
    return {e.text.replace("$(P)", prefix) for e in root.iter("pv_name") if e.text}


@functools.cache
def _tags(cls) -> set[str]:
    """The XML elements a phoebusgen property class writes: read from its methods' source
    (a method's source is found by its line number; a class's would parse its whole module
    on every call), once per class."""
    methods = [f for f in vars(cls).values() if inspect.isfunction(f)]
    return {
        t for f in methods for t in re.findall(r"self\.root,\s*'([a-z_]+)'", inspect.getsource(f))
    }


@functools.cache
def known_properties() -> dict[str, set[str]]:
    """Widget type -> the property elements Phoebus takes for it, as phoebusgen (whose widget
    definitions follow Phoebus's) writes them."""
    base = {"name", "x", "y", "width", "height", "class", "visible", "tooltip", "rules"}
    base |= {"scripts", "actions"}
    known = {}
    for _, cls in inspect.getmembers(phoebus_widgets, inspect.isclass):
        init = inspect.getsource(cls.__init__) if "__init__" in vars(cls) else ""
        match = re.search(r"_Widget.__init__\(self, '([a-z0-9_\-]+)'", init)
        if not match:
            continue
        tags = set(base)
        for mixin in cls.__mro__:
            if mixin.__module__ == phoebus_properties.__name__:
                tags |= _tags(mixin)
        known[match.group(1)] = tags
    return known


def unknown_properties(path: Path) -> list[str]:
    """Widgets or properties in a screen that Phoebus does not know."""
    known = known_properties()
    problems = []
    for w in ET.parse(path).getroot().iter("widget"):
        kind = w.get("type")
        if kind not in known:
            problems.append(f"widget type {kind!r}")
            continue
        problems += [f"{kind}.{child.tag}" for child in w if child.tag not in known[kind]]
    return problems


# ---- a picture of a screen, drawn from the live PVs ------------------------------------------

_SEVERITY_COLOURS = {"NO_ALARM": "#3a3", "MINOR": "#e8c000", "MAJOR": "#e00", "INVALID": "#e0e"}


def _live(names: set[str], timeout: float = 3.0) -> dict[str, tuple]:
    """name (as the screen writes it) -> (formatted value, units, severity, raw PVA value)."""
    from edgeloop.app.status import ca_rows, pva_row

    pva = sorted(n for n in names if n.startswith("pva://"))
    ca = sorted(n for n in names if not n.startswith("pva://"))
    live = {}
    with Context("pva", nt=False) as ctx:
        values = ctx.get([n[len("pva://") :] for n in pva], timeout=timeout, throw=False)
    for name, value in zip(pva, values):
        _, text, units, severity, connected = pva_row(name, value)
        live[name] = (text, units, severity if connected == "yes" else "INVALID", value)
    for name, text, units, severity, connected in ca_rows(ca, timeout):
        live[name] = (text, units, severity if connected == "yes" else "INVALID", None)
    return live


@dataclass
class _Drawn:
    """One widget of a .bob with the live value of its PV, as the drawers take it."""

    element: ET.Element
    x: int
    y: int
    wd: int
    ht: int
    title: str
    text: str
    units: str
    severity: str
    raw: object


def _draw_label(ax, w: _Drawn) -> None:
    from matplotlib.patches import Rectangle

    header = w.element.find("background_color") is not None
    bold = w.element.find("font") is not None
    if header:
        ax.add_patch(Rectangle((w.x, w.y), w.wd, w.ht, color="#7890a8"))
    ax.text(
        w.x + (w.wd / 2 if header else 2),
        w.y + w.ht / 2,
        w.title,
        va="center",
        ha="center" if header else "left",
        fontsize=16 if header else (11 if bold else 9),
        fontweight="bold" if bold else "normal",
    )


def _draw_image(ax, w: _Drawn) -> None:
    from matplotlib.patches import Rectangle

    from edgeloop import ntnd

    raw = w.raw
    if raw is not None and not isinstance(raw, Exception) and raw["uniqueId"] > 0:
        extent = (w.x, w.x + w.wd, w.y + w.ht, w.y)
        ax.imshow(ntnd.decode(raw).data, cmap="gray", extent=extent, aspect="auto", zorder=2)
    edge = _SEVERITY_COLOURS[w.severity]
    ax.add_patch(Rectangle((w.x, w.y), w.wd, w.ht, fill=False, ec=edge, lw=1.5))


def _draw_table(ax, w: _Drawn) -> None:
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((w.x, w.y), w.wd, w.ht, color="white", ec="#888"))
    if w.raw is None or isinstance(w.raw, Exception):
        return
    labels = list(w.raw["labels"])[:8]
    lines = ["   ".join(f"{c:>9s}" for c in labels)]
    columns = [w.raw["value"][c] for c in labels]
    rows = 0 if columns[0] is None else len(columns[0])
    for r in range(min(rows, 9)):
        lines.append("   ".join(f"{float(column[r]):9.2f}" for column in columns))
    ax.text(w.x + 4, w.y + 4, "\n".join(lines), va="top", family="monospace", fontsize=8)


def _draw_progressbar(ax, w: _Drawn) -> None:
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((w.x, w.y), w.wd, w.ht, color="white", ec="#888"))
    try:
        done = min(float(w.text), 100) / 100
    except ValueError:
        return
    ax.add_patch(Rectangle((w.x, w.y), w.wd * done, w.ht, color="#4a4"))


def _draw_button(ax, w: _Drawn) -> None:
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((w.x, w.y), w.wd, w.ht, color="#d8d8d8", ec="#777"))
    ax.text(w.x + w.wd / 2, w.y + w.ht / 2, w.title, ha="center", va="center", fontsize=10)


def _draw_text(ax, w: _Drawn, face: str = "#ffffff") -> None:
    from matplotlib.patches import Rectangle

    edge = _SEVERITY_COLOURS[w.severity]
    ax.add_patch(Rectangle((w.x, w.y), w.wd, w.ht, color=face, ec=edge, lw=1.2))
    shown = f"{w.text} {w.units}".strip() if w.severity != "INVALID" else "<disconnected>"
    ax.text(w.x + 4, w.y + w.ht / 2, shown, va="center", fontsize=9, clip_on=True)


# how render draws each Phoebus widget type
_DRAWERS = {
    "label": _draw_label,
    "image": _draw_image,
    "table": _draw_table,
    "progressbar": _draw_progressbar,
    "action_button": _draw_button,
    "textupdate": lambda ax, w: _draw_text(ax, w, "#e8e8e8"),
    "textentry": _draw_text,
    "combo": _draw_text,
}


def render(path: Path, prefix: str, png: Path) -> Path:
    """Draw ``path`` (a .bob) as Phoebus would show it with the live values of ``prefix``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    root = ET.parse(path).getroot()
    width, height = int(root.findtext("width")), int(root.findtext("height"))
    live = _live(pv_names(path, prefix))
    fig = plt.figure(figsize=(width / 100, height / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    ax.add_patch(Rectangle((0, 0), width, height, color="#f0f0f0"))
    for w in root.iter("widget"):
        draw = _DRAWERS.get(w.get("type"))
        if draw is None:
            continue
        pv = (w.findtext("pv_name") or "").replace("$(P)", prefix)
        text, units, severity, raw = live.get(pv, ("", "", "INVALID", None))
        box = [int(w.findtext(k)) for k in ("x", "y", "width", "height")]
        title = (w.findtext("text") or "").replace("$(P)", prefix)
        draw(ax, _Drawn(w, *box, title, text, units, severity, raw))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
