"""How every stage starts and ends: params, logging, signals, one-line expected failures (docs/reliability.md)."""

import argparse
import contextlib
import errno
import gc
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
INTERRUPTED_EXIT_STATUS = 130  # as a shell reports a process ended by SIGINT
DVC_POLL_S = 1.0
PARENT_GONE = signal.SIGHUP  # sent to itself when dvc is gone: a second SIGTERM would mean "stop at once"
_received: list[str] = []


def setup_stage(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[argparse.Namespace, Params]:
    """Parse arguments and `-S` overrides, set up logging and signals, load the params and check the model's access."""
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
    """Run a stage's `main`: an expected error, a stop or a full disk end it in one line; a bug keeps its traceback."""
    gc.freeze()  # what the imports built lives as long as the process: no collection need look at it again
    gc.enable()
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
    """Record that the stage is stopping on signal `name`: its dvc going away then is no second request."""
    _received.append(name)


def _interrupt(signum: int, frame: object) -> None:
    if signum == PARENT_GONE and _received:
        return  # dvc went away because of the signal being handled
    stopping(signal.Signals(signum).name)
    raise KeyboardInterrupt(f"{signal.Signals(signum).name} received")


def dvc_process() -> psutil.Process | None:
    """The `dvc` process this stage runs under (`dvc repro`, `dvc exp run`, a queue worker), if any."""
    for process in psutil.Process().parents():
        with contextlib.suppress(psutil.Error):  # gone, or not ours to read
            if any(Path(arg).name in ("dvc", "dvc.exe") for arg in process.cmdline()[:3]):
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
    """The values `dvc exp run -S key=value` writes into params.yaml, by dotted key (no sweeps, `+key` or `~key`)."""
    if ("exp", "run") not in itertools.pairwise(command):
        return {}
    from dvc.cli import parse_args
    from dvc.utils.cli_parse import to_path_overrides
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    arguments = parse_args(list(command[command.index("exp") :])).set_param or []
    overrides = OverridesParser.create().parse_overrides(to_path_overrides(arguments).get("params.yaml", []))
    changes = (o for o in overrides if o.type == OverrideType.CHANGE and not o.is_sweep_override())
    return {change.key_or_group: change.value() for change in changes}


def restore_experiment_params(path: Path = Path("params.yaml")) -> None:
    """After a failed workspace `dvc exp run`: put the -S values it wrote into params.yaml back as committed."""
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
        if current == committed:  # DVC rewrote the layout too: the committed file, comments and all
            path.write_text(show.stdout, encoding="utf-8")
        else:
            yaml.dump(current, path)
        logger.warning("%s: %s put back as committed (this failed experiment had set them)", path, ", ".join(written))
