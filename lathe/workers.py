"""Independent jobs (e.g. ensemble members) in parallel child processes that die with the stage.

Training on 2 cores runs faster as two 1-thread processes than as one 2-thread process (small
convolutions scale poorly across threads), and the bytes a job makes depend on its own seed and
thread count only, never on which process ran it or how many ran at once.

Children are spawned (a fresh interpreter, not a fork of a process that already started torch's
thread pools) and inherit the environment, so the numeric pins (lathe.determinism) hold in them.
Each child asks the kernel to SIGKILL it when the stage process dies, so a killed stage leaves no
orphan training in the background. Jobs return plain bytes and JSON-like values.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

Progress = Callable[[dict], None]
PR_SET_PDEATHSIG = 1  # linux/prctl.h

_progress_queue: Any = None  # set in each child by _init_child


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op where prctl is missing)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _init_child(progress_queue: Any) -> None:
    global _progress_queue
    die_with_parent()
    _progress_queue = progress_queue


def _call_in_child(job: Callable[..., Any], args: tuple) -> Any:
    return job(*args, progress=_progress_queue.put)


def _forward(progress_queue: Any, progress: Progress | None, stop: threading.Event) -> None:
    """Hand progress rows from the children to `progress` until `stop` and the queue is drained."""
    while not (stop.is_set() and progress_queue.empty()):
        try:
            row = progress_queue.get(timeout=0.2)
        except queue.Empty:
            continue
        if progress is not None:
            progress(row)


def map_jobs(job: Callable[..., Any], arg_list: Sequence[tuple], workers: int,
             progress: Progress | None = None) -> list:
    """[job(*args, progress=...) for args in arg_list], up to `workers` at a time in child processes.

    `job` must be a module-level function (children import it by name); its results come back in
    the order of `arg_list`. With `workers` <= 1 the jobs run here, one after another. A job's
    exception is raised here, after the jobs already running have finished.
    """
    if workers <= 1 or len(arg_list) <= 1:
        return [job(*args, progress=progress or _ignore) for args in arg_list]
    ctx = multiprocessing.get_context("spawn")
    progress_queue = ctx.Queue()
    stop = threading.Event()
    forwarder = threading.Thread(target=_forward, args=(progress_queue, progress, stop), daemon=True)
    forwarder.start()
    try:
        with ProcessPoolExecutor(max_workers=min(workers, len(arg_list)), mp_context=ctx,
                                 initializer=_init_child, initargs=(progress_queue,)) as pool:
            futures = [pool.submit(_call_in_child, job, tuple(args)) for args in arg_list]
            return [f.result() for f in futures]
    finally:
        stop.set()
        forwarder.join()


def _ignore(_row: dict) -> None:
    return None
