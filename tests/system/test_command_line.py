"""The command line's start-up: the commands that need no model (``ioc``, ``tiled``,
``status``, the profiles) start without importing torch, which costs seconds of CPU in each
process a beamline or the tests start."""

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.timeout(120)]

CHECK = """
import sys
from edgeloop.app import cli
parser = cli.build_parser()
parser.parse_args(["models", "list", "--since", "2026-01-01"])
import edgeloop.ioc.beamline, edgeloop.ioc.softioc, edgeloop.app.tiled_server
import edgeloop.app.status, edgeloop.app.ipython_profile, edgeloop.app.queueserver_profile
print("torch" in sys.modules)
"""


def test_commands_that_need_no_model_start_without_torch():
    done = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    # a --where condition is parsed by the model records, which need torch: still refused early
    where = [sys.executable, "-m", "edgeloop.app.cli", "models", "list", "--where", "val_loss"]
    done = subprocess.run(where, capture_output=True, text=True, timeout=90)
    assert done.returncode == 2 and "not a metric condition" in done.stderr, done.stderr
