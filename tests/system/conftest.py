"""Fixtures the system tier shares: ``loop``, a whole loop in this process (tests.kit.loops)."""

import pytest

from tests.kit.loops import Loop


@pytest.fixture
def loop(tmp_path):
    loops = []

    def make(**remote):
        lp = Loop(tmp_path / f"loop{len(loops)}", **remote)
        loops.append(lp)
        return lp

    yield make
    for lp in loops:
        lp.close()
