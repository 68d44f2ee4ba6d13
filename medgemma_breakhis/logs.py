"""Logging and progress bars, shared by the stage scripts and tools.

In a terminal, tqdm's bars as usual. In a log file or pipe (CI, `dvc exp run --queue`), where tqdm writes a line per
update, a bar reports each tenth of its work instead, and only for work that lasts more than a few seconds; the
libraries' own bars (loading and saving weights, datasets, hub downloads, MLflow artifacts) are off there: their work
is logged, or quick.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

Item = TypeVar("Item")

# In a log file, a bar starts reporting once its work has lasted this long: a quick loop writes no line at all.
LOG_FILE_DELAY_S = 5.0

# For a library imported later, the environment variable it reads; for one imported already, its switch.
_LIBRARY_BARS_OFF = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
_LIBRARY_SWITCHES = (
    ("huggingface_hub.utils", "disable_progress_bars"),
    ("transformers.utils.logging", "disable_progress_bar"),  # at import, it follows huggingface_hub's variable
    ("datasets", "disable_progress_bars"),
)


def in_terminal() -> bool:
    return sys.stderr.isatty()


def progress(iterable: Iterable[Item] | None = None, *, total: int | None = None, **kwargs: Any) -> tqdm:
    """tqdm over `iterable` (or `total` steps): in a log file, one line per tenth of the work once it has lasted
    LOG_FILE_DELAY_S, none at 0%."""
    if not in_terminal():
        total = len(iterable) if total is None else total  # type: ignore[arg-type]
        # no time-based refresh (the monitor thread would drop miniters to 1 on a slow step)
        tenth = max(1, math.ceil(total / 10))
        kwargs |= {"mininterval": 0, "maxinterval": math.inf, "miniters": tenth, "delay": max(LOG_FILE_DELAY_S, 1e-9)}
    return tqdm(iterable, total=total, **kwargs)


def quiet_library_progress_bars() -> None:
    for name, value in _LIBRARY_BARS_OFF.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # read on each download
    for module, switch in _LIBRARY_SWITCHES:
        if module in sys.modules:
            getattr(sys.modules[module], switch)()


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not in_terminal():
        quiet_library_progress_bars()
