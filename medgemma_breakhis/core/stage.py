"""How every stage starts and ends: its arguments and params, logging, signals (SIGTERM and a vanished `dvc` stop it
as Ctrl-C does), and an expected failure reported in one line with its exit status (docs/reliability.md)."""

import argparse
import contextlib
import errno
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

from medgemma_breakhis.core.errors import ExpectedError
from medgemma_breakhis.core.logs import configure_logging
from medgemma_breakhis.core.params import Params, add_override_argument, load_params

logger = logging.getLogger(__name__)

# What a stopped stage exits with, as a shell reports a process ended by SIGINT.
INTERRUPTED_EXIT_STATUS = 130
# How often a stage looks whether its dvc is still there.
DVC_POLL_S = 1.0
# What a stage whose dvc is gone sends itself: not SIGTERM, which `timeout … dvc repro` sends too, where a second
# SIGTERM means "stop at once, without a checkpoint".
PARENT_GONE = signal.SIGHUP
_received: list[str] = []


def setup_stage(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[argparse.Namespace, Params]:
    """Parse the stage's arguments and `-S` overrides, set up logging and signals, and load the validated params."""
    add_override_argument(parser)
    args = parser.parse_args(argv)
    configure_logging()
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(PARENT_GONE, _interrupt)
    if (dvc := dvc_process()) is not None:
        threading.Thread(target=_stop_when_gone, args=(dvc,), name="stop-when-dvc-exits", daemon=True).start()
    return args, load_params(overrides=args.overrides)


def stage_entry(main: Callable[[], None]) -> None:
    """Run a stage's `main`: an expected error, a stop or a full disk end it in one line (exit 1, 130, 1); any other
    exception is a bug and keeps its traceback."""
    try:
        main()
    except ExpectedError as err:
        logger.error("%s", err)
        sys.exit(1)
    except KeyboardInterrupt as err:
        logger.error("%s: %s", type(err).__name__, err)
        sys.exit(INTERRUPTED_EXIT_STATUS)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        logger.error(
            "%s: %s. Free some space there (or set TMPDIR elsewhere for temporary files) and run the stage again; "
            "nothing partial was left",
            err.strerror,
            err.filename or "a file of this stage",
        )
        sys.exit(1)


def stopping(name: str) -> None:
    """Record that the stage is stopping on signal `name`: its dvc going away afterwards is no second request."""
    _received.append(name)


def _interrupt(signum: int, frame: object) -> None:
    if signum == PARENT_GONE and _received:
        return  # dvc went away because of the signal being handled
    stopping(signal.Signals(signum).name)
    raise KeyboardInterrupt(f"{signal.Signals(signum).name} received")


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


def _stop_when_gone(dvc: psutil.Process) -> None:
    """DVC does not pass on a signal sent to dvc alone: without this the stage would run on as an orphan."""
    with contextlib.suppress(psutil.NoSuchProcess):
        while dvc.is_running() and dvc.status() != psutil.STATUS_ZOMBIE:
            time.sleep(DVC_POLL_S)
    logger.warning("dvc (process %d) is gone: stopping this stage as on SIGTERM", dvc.pid)
    os.kill(os.getpid(), PARENT_GONE)
