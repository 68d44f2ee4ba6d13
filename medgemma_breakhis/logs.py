"""Logging set-up shared by the stage scripts."""

from __future__ import annotations

import logging
import os
import traceback
from urllib.parse import parse_qsl, unquote, urlsplit

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
    # every handler there is by now: the root's, and those of libraries that print on their own (mlflow, transformers)
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for handler in {h for lg in loggers if isinstance(lg, logging.Logger) for h in lg.handlers}:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())
