"""Ctrl-C for the command line: SIGINT calls a function from a watcher thread.

Unicorn runs guest code with the GIL released, so a Python signal handler does not run until
the next hook fires — never, in a tight guest loop.  The C-level handler still writes the
signal number to the wakeup fd (``signal.set_wakeup_fd``); a thread blocked on that fd wakes
at once and calls ``on_interrupt`` (``Machine.interrupt``, which is thread-safe).  No
KeyboardInterrupt is raised, so none can surface inside a Unicorn callback.
"""
from __future__ import annotations

import ctypes
import os
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator


WATCHER_NAME = "ringminus-ctrlc"         # 15 characters: the most a Linux thread name holds
PR_SET_NAME = 15


def _name_native_thread(name: str) -> None:
    """Linux: name the OS thread too, so top -H, gdb and /proc/PID/task show the watcher
    (and a test can tell when Ctrl-C is being handled)."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode(), 0, 0, 0)
    except (OSError, AttributeError):
        pass


@contextmanager
def calling_on_sigint(on_interrupt: Callable[[], None]) -> Iterator[None]:
    """While the block runs, each SIGINT calls ``on_interrupt()`` (main thread only;
    elsewhere the block runs with the process's handling unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    done = threading.Event()

    def watch() -> None:
        _name_native_thread(WATCHER_NAME)
        while not done.is_set():
            received = os.read(read_end, 64)
            if done.is_set() or not received:
                return
            if signal.SIGINT in received:
                on_interrupt()

    previous_handler = signal.signal(signal.SIGINT, lambda signum, frame: None)   # the thread acts
    previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, name=WATCHER_NAME, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGINT, previous_handler)
        done.set()
        os.write(write_end, b"\0")
        watcher.join()
        os.close(read_end)
        os.close(write_end)
