"""EPICS network settings: the production commands use the user's EPICS environment, the demo
pins loopback whatever the shell holds, and a PV that cannot be reached is named together
with the address list searched."""

from edgeloop.config import LOOPBACK_ENV, pin_loopback, search_hint


def test_pin_loopback_keeps_the_callers_settings_unless_forced():
    shell = {"EPICS_PVA_ADDR_LIST": "10.1.2.255", "EPICS_CA_AUTO_ADDR_LIST": "YES"}
    kept = dict(shell)
    pin_loopback(kept)
    assert kept["EPICS_PVA_ADDR_LIST"] == "10.1.2.255"  # an IPython session's own setting
    assert kept["EPICS_PVA_AUTO_ADDR_LIST"] == "NO"
    pinned = dict(shell)
    pin_loopback(pinned, force=True)  # the demo
    assert {k: pinned[k] for k in LOOPBACK_ENV} == LOOPBACK_ENV
    assert search_hint("ca", {"EPICS_CA_ADDR_LIST": "a b"}) == (
        "searched EPICS_CA_ADDR_LIST='a b', EPICS_CA_AUTO_ADDR_LIST=YES"
    )
