"""The operator screens: the committed .bob files are what the generator writes, every
widget and property is one Phoebus knows, every PV a screen names answers on a running loop
through real CA and PVA clients, and the overview draws from the live PVs."""

from pathlib import Path

import pytest
from p4p.client.thread import Context

from edgeloop.app import screens
from edgeloop.app.status import ca_rows

SCREENS = Path(__file__).resolve().parents[2] / "screens"


@pytest.mark.timeout(120)
def test_every_pv_on_the_screens_answers_and_the_overview_draws(system, tmp_path):
    p = system.prefix
    names = set()
    for name in screens.SCREENS:
        names |= screens.pv_names(SCREENS / f"{name}.bob", p)
    pva = sorted(n[len("pva://") :] for n in names if n.startswith("pva://"))
    ca = sorted(n for n in names if "://" not in n)
    assert len(pva) >= 15 and len(ca) >= 25
    with Context("pva", nt=False) as ctx:
        values = ctx.get(pva, timeout=5, throw=False)
    assert [n for n, v in zip(pva, values) if isinstance(v, Exception)] == []
    assert [row[0] for row in ca_rows(ca, timeout=5) if row[4] != "yes"] == []
    png = screens.render(SCREENS / "overview.bob", p, tmp_path / "overview.png")
    assert png.stat().st_size > 20_000
