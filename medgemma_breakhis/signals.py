"""SIGTERM handled like Ctrl-C, so a stage stopped by `kill` or a job scheduler unwinds instead of vanishing; and a
stage that stops the same way when the `dvc` that started it is gone, instead of running on as an orphan."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

# How often a stage looks whether its dvc is still there: the longest an orphaned stage runs on before it stops.
DVC_POLL_S = 1.0
# What a stage whose dvc is gone sends itself: SIGHUP, the signal of a lost parent, handled like SIGTERM. Not SIGTERM
# itself, which `timeout … dvc repro` sends to the stage as well: a second SIGTERM means "stop at once", and the dvc
# that vanished with the first must not turn a clean stop (train's checkpoint) into that.
PARENT_GONE = signal.SIGHUP
_received: list[str] = []


def stopping(name: str) -> None:
    """Record that the stage is stopping because of the signal `name`: its dvc going away afterwards (for the same
    signal, or because the stage stops) is then no second request, and never cuts short how the stage ends."""
    _received.append(name)


def _interrupt(signum: int, frame: object) -> None:
    if signum == PARENT_GONE and _received:
        return  # already stopping: dvc went away because of the same signal
    stopping(signal.Signals(signum).name)
    raise KeyboardInterrupt(f"{signal.Signals(signum).name} received")


def interrupt_on_sigterm() -> None:
    """Make SIGTERM (and `PARENT_GONE`) raise KeyboardInterrupt: `with` blocks then run their exits, so the stage's
    MLflow run ends KILLED and staging folders are removed. (`train` replaces it while training, to save a checkpoint
    first.)"""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(PARENT_GONE, _interrupt)


def dvc_process() -> psutil.Process | None:
    """The `dvc` process this stage runs under (`dvc repro`, `dvc exp run`, a queue worker), if any."""
    for process in psutil.Process().parents():
        try:
            command = process.cmdline()
        except psutil.Error:
            continue
        if any(Path(arg).name in ("dvc", "dvc.exe") for arg in command[:3]):
            return process
    return None


def _gone(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _watch(dvc: psutil.Process) -> None:
    while not _gone(dvc):
        time.sleep(DVC_POLL_S)
    logger.warning(
        "dvc (process %d) is gone: stopping this stage as on SIGTERM; dvc records nothing of a run it no longer "
        "watches",
        dvc.pid,
    )
    os.kill(os.getpid(), PARENT_GONE)


def stop_when_dvc_exits() -> None:
    """Under dvc, watch it from a daemon thread, and stop this stage as on SIGTERM once it is gone.

    DVC runs a stage as its child (`$SHELL -c <cmd>`, in dvc's process group) and does not pass on a signal sent to
    dvc alone (`kill <dvc pid>`, a queue worker stopped, a crash): without this the stage ran to its end as an orphan,
    rewrote its outputs and ended its MLflow runs FINISHED, while dvc.lock never recorded them. (`timeout` and Ctrl-C
    signal the whole process group, the stage included.)
    """
    dvc = dvc_process()
    if dvc is not None:
        threading.Thread(target=_watch, args=(dvc,), name="stop-when-dvc-exits", daemon=True).start()
