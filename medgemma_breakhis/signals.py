"""SIGTERM handled like Ctrl-C, so a stage stopped by `kill` or a job scheduler unwinds instead of vanishing."""

from __future__ import annotations

import signal


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"{signal.Signals(signum).name} received")


def interrupt_on_sigterm() -> None:
    """Make SIGTERM raise KeyboardInterrupt: `with` blocks then run their exits, so the stage's MLflow run ends KILLED
    and staging folders are removed. (`train` replaces it while training, to save a checkpoint first.)"""
    signal.signal(signal.SIGTERM, _interrupt)
