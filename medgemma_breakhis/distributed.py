"""Multi-process (DDP) training through `accelerate launch`.

`train.num_processes` > 1 makes the `train` stage start itself again under `accelerate launch`, one process per GPU
(or, on a machine without one, per CPU process with the gloo backend). Which process is which comes from the
variables accelerate's launcher (torch.distributed.run) sets; a plain `python` run is process 0 of 1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from medgemma_breakhis.errors import ExpectedError


class ProcessCountError(ExpectedError, RuntimeError):
    """The processes that were launched are not as many as the params ask for."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Rank 0: the one process that tracks in MLflow and writes the stage's outputs."""
    return int(os.environ.get("RANK", "0")) == 0


def accelerate_launch_command(num_processes: int, module: str, arguments: Sequence[str]) -> list[str]:
    """`accelerate launch` of `python -m module arguments` on `num_processes` processes of this machine.

    Every launcher setting is given, so no `accelerate config` file is read. Mixed precision is left to the trainer,
    which sets it from train.precision. Port 0 makes accelerate pick a free port: concurrent distributed runs (DVC
    queue workers) must not share its default 29500.
    """
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        f"--num_processes={num_processes}",
        "--num_machines=1",
        "--main_process_port=0",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        "--module",
        module,
        *arguments,
    ]


def run_distributed_if_asked(num_processes: int, module: str, arguments: Sequence[str]) -> None:
    """Replace this process by `accelerate launch` when `num_processes` > 1 and it is not yet one of several.

    Refuses to train when launched by hand on another number of processes than the params say, since the
    effective batch size (and so the result) depends on it.
    """
    launched = world_size()
    if launched > 1 or "LOCAL_RANK" in os.environ:
        if launched != num_processes:
            raise ProcessCountError(
                f"launched on {launched} processes but train.num_processes={num_processes}; set "
                f"-S train.num_processes={launched} so the params record what ran"
            )
        return
    if num_processes > 1:
        _exec(accelerate_launch_command(num_processes, module, arguments))


def _exec(command: list[str]) -> NoReturn:
    # exec, not a child process: signals (Ctrl-C, SIGTERM) then reach the launcher, which passes them to every rank
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
