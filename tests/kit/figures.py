"""Figures drawn headless the way a GUI draws them."""

from __future__ import annotations

import contextlib
import time

from matplotlib.backends.backend_agg import FigureCanvasAgg


@contextlib.contextmanager
def draws_coalesced(interval_s: float = 0.2):
    """Agg draws at every ``draw_idle`` call, so a callback that asks for a redraw per
    event draws a figure per event. A GUI's event loop coalesces those requests into one
    draw per refresh; here, at most one per canvas per ``interval_s``, and what is still
    pending is drawn on leaving (so a drawing error still surfaces)."""
    original = FigureCanvasAgg.draw_idle
    last: dict[int, float] = {}
    pending: dict[int, FigureCanvasAgg] = {}

    def draw_idle(canvas, *args, **kwargs):
        now = time.monotonic()
        if now - last.get(id(canvas), 0.0) >= interval_s:
            last[id(canvas)] = now
            pending.pop(id(canvas), None)
            original(canvas, *args, **kwargs)
        else:
            pending[id(canvas)] = canvas

    FigureCanvasAgg.draw_idle = draw_idle
    try:
        yield
    finally:
        FigureCanvasAgg.draw_idle = original
        for canvas in pending.values():
            canvas.draw()
