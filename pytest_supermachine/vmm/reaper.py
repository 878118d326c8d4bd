"""Tears VMs down off the caller's path.

Closing a KVM VM fd costs ~16 ms here (the kernel frees the whole VM); a test
that waits for that on every stop pays it for nothing. `reap(fn)` queues the
teardown for one daemon thread; `drain()` waits until everything queued has
run, which leak checks and interpreter exit use.
"""

from __future__ import annotations

import atexit
import queue
import threading
from collections.abc import Callable

_queue: queue.Queue[Callable[[], None]] = queue.Queue()
_thread: threading.Thread | None = None
_lock = threading.Lock()


def _worker() -> None:
    while True:
        job = _queue.get()
        try:
            job()
        except Exception:  # teardown must go on: one failure cannot leak the rest
            import traceback

            traceback.print_exc()
        finally:
            _queue.task_done()


def reap(job: Callable[[], None]) -> None:
    """Run `job` soon on the reaper thread."""
    global _thread
    with _lock:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_worker, name="supermachine-reaper", daemon=True)
            _thread.start()
    _queue.put(job)


def drain() -> None:
    """Block until every queued teardown has run."""
    _queue.join()


atexit.register(drain)
