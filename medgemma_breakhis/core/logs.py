"""Logging with secrets masked, and progress bars that suit a terminal or a log file (docs/design.md#logs)."""

import logging
import math
import os
import sys
import traceback
import warnings
from collections.abc import Iterable
from typing import Any
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

from tqdm import tqdm

LOG_FILE_DELAY_S = 5.0  # in a log file, a bar starts reporting once its work has lasted this long
SECRET_VARIABLES = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "HF_TOKEN", "KAGGLE_KEY", "GIT_TOKEN")
MIN_SECRET_LENGTH = 6  # shorter values would mask ordinary words, and no real credential is that short
_LIBRARY_BARS_OFF = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # read on each download
}
_LIBRARY_SWITCHES = (
    ("huggingface_hub.utils", "disable_progress_bars"),
    ("transformers.utils.logging", "disable_progress_bar"),  # at import, it follows huggingface_hub's variable
    ("datasets", "disable_progress_bars"),
)


def in_terminal() -> bool:
    return sys.stderr.isatty()


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, **kwargs: Any) -> tqdm:
    """tqdm over `iterable` (or `total` steps); in a log file, a line per tenth of the work after LOG_FILE_DELAY_S."""
    if not in_terminal():
        total = len(iterable) if total is None else total  # type: ignore[arg-type]
        # no time-based refresh (the monitor thread would drop miniters to 1 on a slow step)
        tenth = max(1, math.ceil(total / 10))
        kwargs |= {"mininterval": 0, "maxinterval": math.inf, "miniters": tenth, "delay": max(LOG_FILE_DELAY_S, 1e-9)}
    return tqdm(iterable, total=total, **kwargs)


def uri_credentials(uri: str) -> list[str]:
    parts = urlsplit(uri)
    raw = [parts.username, parts.password, *(value for _, value in parse_qsl(parts.query, True))]
    return sorted({value for text in raw if text for value in (text, unquote(text))}, key=len, reverse=True)


def without_user_info(parts: SplitResult) -> SplitResult:
    """`parts` without a user name or password, its host and port as written (IPv6 brackets kept)."""
    return parts._replace(netloc=parts.netloc.rpartition("@")[2])


def shown_uri(uri: str) -> str:
    """`uri` for messages: without its user name and password, its query string's values masked."""
    parts = urlsplit(uri)
    if not parts.netloc:  # sqlite:////path, file:///path: nothing to hide, and rebuilding would drop a slash
        return uri
    parts = without_user_info(parts)
    if parts.query:
        parts = parts._replace(query="&".join(f"{key}=***" for key, _ in parse_qsl(parts.query, True)))
    return parts.geturl()


def redacted(text: str, uri: str) -> str:
    """`text` (an error that may quote `uri`) without the credentials in `uri`."""
    for secret in uri_credentials(uri):
        text = text.replace(secret, "***")
    return text


class RedactSecrets(logging.Filter):
    """Masks the environment's credentials (`SECRET_VARIABLES`, MLFLOW_TRACKING_URI's) in a record and its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        values = [os.environ.get(name, "") for name in SECRET_VARIABLES]
        values += uri_credentials(os.environ.get("MLFLOW_TRACKING_URI", ""))
        secrets = sorted({value for value in values if len(value) >= MIN_SECRET_LENGTH}, key=len, reverse=True)
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
    """INFO to stderr, every handler masking secrets (libraries' too); libraries' own bars off outside a terminal."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)  # peft's and trl's
    if not in_terminal():
        for name, value in _LIBRARY_BARS_OFF.items():
            os.environ.setdefault(name, value)
        for module, switch in _LIBRARY_SWITCHES:
            if module in sys.modules:
                getattr(sys.modules[module], switch)()
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for handler in {h for lg in loggers if isinstance(lg, logging.Logger) for h in lg.handlers}:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())
