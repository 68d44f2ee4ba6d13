"""Logging and progress bars, shared by the stage scripts and tools: secrets masked in every record, bars that suit
a terminal or a log file.

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
import traceback
from collections.abc import Iterable
from typing import Any, TypeVar
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

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


# Variables whose values are credentials, for MLflow, the Hugging Face hub, Kaggle and git.
SECRET_VARIABLES = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "HF_TOKEN", "KAGGLE_KEY", "GIT_TOKEN")
# Shorter values would mask ordinary words, and no real credential is that short.
MIN_SECRET_LENGTH = 6


def uri_credentials(uri: str) -> list[str]:
    """What in `uri` must never be shown: its user name and password and its query string's values, as written and
    decoded; longest first, so that a value is masked before any part of it."""
    parts = urlsplit(uri)
    raw = [parts.username, parts.password, *(value for _, value in parse_qsl(parts.query, True))]
    return sorted({value for text in raw if text for value in (text, unquote(text))}, key=len, reverse=True)


def without_user_info(parts: SplitResult) -> SplitResult:
    """`parts` without a user name or password: its host and port as written (rebuilt from `hostname`, an IPv6
    address would lose its brackets)."""
    return parts._replace(netloc=parts.netloc.rpartition("@")[2])


def secret_values() -> list[str]:
    """The credentials in this process's environment: the variables above and those in MLFLOW_TRACKING_URI."""
    values = [os.environ.get(name, "") for name in SECRET_VARIABLES]
    values += uri_credentials(os.environ.get("MLFLOW_TRACKING_URI", ""))
    return sorted({value for value in values if len(value) >= MIN_SECRET_LENGTH}, key=len, reverse=True)


class RedactSecrets(logging.Filter):
    """Masks every credential of the environment in a record, its traceback included: the last line of defence for
    messages that libraries (MLflow, urllib3, transformers) build from URLs and errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = secret_values()
        if not secrets:
            return True
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
            record.exc_info, record.exc_text = None, None
        for secret in secrets:
            message = message.replace(secret, "***")
        record.msg, record.args = message, ()
        return True


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not in_terminal():
        quiet_library_progress_bars()
    # every handler there is by now: the root's, and those of libraries that print on their own (mlflow, transformers)
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for handler in {h for lg in loggers if isinstance(lg, logging.Logger) for h in lg.handlers}:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())
