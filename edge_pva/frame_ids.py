"""Which arriving frames are new, by their uniqueId and timeStamp."""

from __future__ import annotations

import collections
import threading


class FrameIds:
    """Tells a new frame from a repeat and counts the frames a source skipped.

    A frame is identified by (uniqueId, timeStamp): a pvDatabase server (pvapy, areaDetector's
    NDPluginPva) answering a pipelined monitor can deliver one frame many times, each copy
    with the same identity; those repeats are refused and counted.  A uniqueId above the last
    one plus one counts the frames in between as missed; a lower one is a restarted counter
    (a new acquisition), not a gap.  The identities of the last ``memory`` frames are kept.
    """

    def __init__(self, memory: int = 4096):
        self._recent: collections.OrderedDict = collections.OrderedDict()
        self._memory = memory
        self._lock = threading.Lock()
        self.last: int | None = None
        self.repeats = 0
        self.missed = 0

    def is_new(self, unique_id: int, stamp: tuple[int, int]) -> bool:
        key = (unique_id, stamp)
        with self._lock:
            if key in self._recent:
                self.repeats += 1
                return False
            self._recent[key] = None
            if len(self._recent) > self._memory:
                self._recent.popitem(last=False)
            if self.last is not None and unique_id > self.last + 1:
                self.missed += unique_id - self.last - 1
            self.last = unique_id
            return True
