"""The service hands back what a retraining freed (remote/memory.py): a burst freed in a
thread, held by glibc's arena, goes back to the OS."""

import threading

import psutil
import pytest

from edgeloop.remote import memory


@pytest.mark.skipif(memory._LIBC is None, reason="malloc_trim is glibc's")
def test_memory_a_thread_freed_goes_back_to_the_os():
    proc = psutil.Process()
    kept = []
    # what earlier tests freed goes first: pages the burst reuses are then counted as its
    memory.release_freed_memory()

    def burst():  # 100 KB blocks with a small one kept between each: no automatic trim
        blocks = []
        for _ in range(2000):
            blocks.append(b"\x01" * 100_000)  # written: resident
            kept.append(bytes(1_000))
        del blocks

    thread = threading.Thread(target=burst)
    thread.start()
    thread.join()
    held = proc.memory_info().rss
    assert memory.release_freed_memory() is True
    released_mb = (held - proc.memory_info().rss) / 2**20
    assert released_mb > 100, f"{released_mb:.0f} MB released of the 190 MB freed"
