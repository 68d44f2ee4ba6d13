"""How every stage starts and ends: its arguments and params, logging, signals (SIGTERM and a vanished `dvc` stop it
as Ctrl-C does), and an expected failure reported in one line with its exit status (docs/reliability.md)."""

import argparse
import contextlib
import errno
import itertools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
from ruamel.yaml import YAML

from medgemma_breakhis.core.errors import ExpectedError, ParamsChangedError
from medgemma_breakhis.core.files import main_repo_root
from medgemma_breakhis.core.hub import check_hub_access
from medgemma_breakhis.core.logs import configure_logging
from medgemma_breakhis.core.params import Params, add_override_argument, dotted_get, load_params, set_in

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
    """Parse the stage's arguments and `-S` overrides, set up logging and signals, load the validated params, and check
    that the pipeline's model can be had (before any data is drawn or downloaded for it)."""
    add_override_argument(parser)
    args = parser.parse_args(argv)
    configure_logging()
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(PARENT_GONE, _interrupt)
    if (dvc := dvc_process()) is not None:
        threading.Thread(target=_stop_when_gone, args=(dvc,), name="stop-when-dvc-exits", daemon=True).start()
    params = load_params(overrides=args.overrides)
    check_hub_access(params.model)
    return args, params


def stage_entry(main: Callable[[], None]) -> None:
    """Run a stage's `main`: an expected error, a stop or a full disk end it in one line (exit 1, 130, 1); any other
    exception is a bug and keeps its traceback."""
    try:
        main()
    except ExpectedError as err:
        logger.error("%s", err)
        if not isinstance(err, ParamsChangedError):  # then they are another experiment's
            restore_experiment_params()
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


def dvc_set_params(command: Sequence[str]) -> dict[str, Any]:
    """The values a `dvc exp run -S key=value` command line writes into params.yaml, by dotted key, read by DVC's own
    parsers; sweeps, other files' keys and Hydra's `+key`/`~key` forms are left out."""
    if ("exp", "run") not in itertools.pairwise(command):
        return {}
    from dvc.cli import parse_args
    from dvc.utils.cli_parse import to_path_overrides
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    arguments = parse_args(list(command[command.index("exp") :])).set_param or []
    overrides = OverridesParser.create().parse_overrides(to_path_overrides(arguments).get("params.yaml", []))
    return {
        override.key_or_group: override.value()
        for override in overrides
        if override.type == OverrideType.CHANGE and not override.is_sweep_override()
    }


def restore_experiment_params(path: Path = Path("params.yaml")) -> None:
    """In a workspace `dvc exp run`: put the values its -S wrote into params.yaml, where they are still as written,
    back to the committed ones, so that a failed experiment leaves params.yaml as it was."""
    try:
        command = dvc.cmdline() if (dvc := dvc_process()) is not None else []
    except psutil.Error:  # dvc is gone: the stage is being stopped
        return
    if {"--temp", "--queue", "--run-all"} & set(command) or Path.cwd().resolve() != main_repo_root():
        return
    show = subprocess.run(["git", "show", f"HEAD:{path}"], capture_output=True, text=True, check=False)
    if show.returncode != 0:  # nothing committed to go back to
        return
    yaml, committed = YAML(), YAML(typ="safe").load(show.stdout)
    current = yaml.load(path)
    written = [key for key, value in dvc_set_params(command).items() if dotted_get(current, key) == value]
    for key in written:
        set_in(current, key, dotted_get(committed, key))
    if written:
        yaml.dump(current, path)
        logger.warning("%s: %s put back as committed (this failed experiment had set them)", path, ", ".join(written))
