"""The test kit: helpers both tiers import (never runtime code).

- ``env``: EPICS settings, the ports and prefixes allocator, shared data;
- ``servers``: the loop's servers as subprocesses; ``answers``: frames in, answers out;
- ``runs``: a real RunEngine; ``waiting``: conditions to wait on; ``leaks``: what a test
  left running;
- scripts run as processes: ``access_client.py``, ``ad_server.py``, ``pvapy_frames.py``;
  ``pvapy_sources``: pvapy's AD-sim server as a frame source.
"""
