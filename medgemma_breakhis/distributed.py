"""Which process of a distributed (DDP) training this is, read from the variables `accelerate launch` and torchrun
set; a plain `python` run is process 0 of 1."""

from __future__ import annotations

import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0: the one process that tracks in MLflow and writes the stage's outputs."""
    return int(os.environ.get("RANK", "0")) == 0
