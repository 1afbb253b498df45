"""The uniqueId rules, in one place: which arriving frames are new, late, repeated, or start a
new acquisition, by their uniqueId and timeStamp.

- ``FrameIds``: frames of one source in the order it sent them (the edge, the reference
  monitor, the workers' aggregate's witness of the source);
- ``AcquisitionOrder``: answers to those frames arriving out of order (several workers):
  which acquisition each belongs to."""

from __future__ import annotations

import collections
import enum
import threading


class Arrival(enum.Enum):
    NEW = "new"  # the next frame of the running acquisition (or after a gap)
    LATE = "late"  # a uniqueId below the last one that was missing: out of order
    RESTART = "restart"  # the counter went back: a new acquisition
    REPEAT = "repeat"  # seen already: refused


class FrameIds:
    """Tells a new frame from a repeat and counts the frames a source skipped.

    A frame is identified by its uniqueId within one acquisition.  A pvDatabase server
    (pvapy, areaDetector's NDPluginPva) answering a pipelined monitor can deliver one frame
    many times, and a faulty source can send a uniqueId twice: each uniqueId is answered
    once.  A uniqueId above the last one plus one counts the ones in between as missed; one
    of those arriving later (out of order) is answered and no longer missed.  Any other
    uniqueId below the last one, or a seen one with a new timeStamp below the last, is a
    restarted counter (a new acquisition, numbered in ``acquisition``).  The last ``memory``
    uniqueIds are remembered, and with ``numbered`` the acquisition of each of the last
    ``memory`` frames (:meth:`acquisition_of`: what a witness of the source tells an
    :class:`AcquisitionOrder`).
    """

    def __init__(self, memory: int = 4096, numbered: bool = False):
        self._seen: collections.OrderedDict = collections.OrderedDict()  # uid -> stamp
        self._missing: collections.OrderedDict = collections.OrderedDict()
        self._numbers: collections.OrderedDict | None = (
            collections.OrderedDict() if numbered else None  # (uid, stamp) -> acquisition
        )
        self._memory = memory
        self._lock = threading.Lock()
        self.last: int | None = None
        self.repeats = 0
        self.missed = 0
        self.acquisition = 0

    def arrival(self, unique_id: int, stamp: tuple[int, int]) -> Arrival:
        with self._lock:
            seen = self._seen.get(unique_id)
            if seen is not None and (seen == stamp or unique_id >= self.last):
                self.repeats += 1
                return Arrival.REPEAT
            if self.last is None or unique_id > self.last:
                verdict = Arrival.NEW
                if self.last is not None:
                    self._gap(self.last + 1, unique_id)
                self.last = unique_id
            elif unique_id in self._missing:
                del self._missing[unique_id]
                self.missed -= 1
                verdict = Arrival.LATE
            else:
                self._seen.clear()
                self._missing.clear()
                self.last = unique_id
                self.acquisition += 1
                verdict = Arrival.RESTART
            self._seen[unique_id] = stamp
            while len(self._seen) > self._memory:
                self._seen.popitem(last=False)
            if self._numbers is not None:
                self._numbers[(unique_id, stamp)] = self.acquisition
                while len(self._numbers) > self._memory:
                    self._numbers.popitem(last=False)
            return verdict

    def acquisition_of(self, unique_id: int, stamp: tuple[int, int]) -> int | None:
        """The acquisition a frame arrived in (``numbered``), None if not seen or forgotten."""
        with self._lock:
            return None if self._numbers is None else self._numbers.get((unique_id, stamp))

    def _gap(self, first: int, end: int) -> None:
        self.missed += end - first
        # remember the newest missing ids only: a huge jump is counted, not listed
        for uid in range(max(first, end - self._memory), end):
            self._missing[uid] = None
        while len(self._missing) > self._memory:
            self._missing.popitem(last=False)


class AcquisitionOrder:
    """Tells, for frames arriving out of order, whether each belongs to the current
    acquisition, and when a new one starts.

    Where a witness of the source (a ``numbered`` FrameIds) saw the frame, its acquisition
    number decides: that holds when the detector's clock stepped back at the restart. Else
    the time stamps do: within an acquisition a lower uniqueId has an earlier time stamp,
    so a frame whose uniqueId is not higher than the highest yet, with a later time stamp,
    starts a new acquisition; one stamped before that start is a late one of the previous
    acquisition."""

    def __init__(self):
        # the highest uniqueId and time stamp of this acquisition, and the last time stamp
        # of the previous ones
        self._newest: tuple[int, tuple[int, int]] | None = None
        self.boundary: tuple[int, int] | None = None
        self.number: int | None = None  # the witness's number of the current acquisition

    def current(self, stamp: tuple[int, int], acquisition: int | None = None) -> bool:
        """Whether a frame stamped so (in the witness's ``acquisition``, where known)
        belongs to the current acquisition (a frame seen before: no new verdict)."""
        if acquisition is not None and self.number is not None:
            return acquisition == self.number
        return self.boundary is None or stamp > self.boundary

    def arrival(
        self, unique_id: int, stamp: tuple[int, int], acquisition: int | None = None
    ) -> tuple[bool, bool]:
        """A frame seen for the first time: (in the current acquisition, starts a new one)."""
        if acquisition is None:
            return self._by_stamp(unique_id, stamp)
        if self.number is None:  # the witness's first word: its number, the stamps' verdict
            self.number = acquisition
            return self._by_stamp(unique_id, stamp)
        if acquisition < self.number:
            return False, False
        if acquisition > self.number:
            last = self._newest[1] if self._newest else None
            # the stamp rule's boundary, unless the detector's clock went back
            self.boundary = last if last is not None and stamp > last else None
            self.number, self._newest = acquisition, (unique_id, stamp)
            return True, True
        self._advance(unique_id, stamp)
        return True, False

    def _by_stamp(self, unique_id: int, stamp: tuple[int, int]) -> tuple[bool, bool]:
        if self.boundary is not None and stamp <= self.boundary:
            return False, False
        if self._newest is None:
            self._newest = (unique_id, stamp)
            return True, False
        newest_uid, newest_stamp = self._newest
        if unique_id <= newest_uid and stamp > newest_stamp:
            self.boundary = newest_stamp
            self._newest = (unique_id, stamp)
            return True, True
        self._advance(unique_id, stamp)
        return True, False

    def _advance(self, unique_id: int, stamp: tuple[int, int]) -> None:
        if self._newest is None:
            self._newest = (unique_id, stamp)
        else:
            self._newest = (max(unique_id, self._newest[0]), max(stamp, self._newest[1]))
