"""Expected errors, and how a stage reports them: one message that names what to fix, no traceback.

An expected error is one the user causes and can fix (a param, the data, a model that does not load, missing
credentials, an unreachable tracking store); its message already says what to change, so a traceback would only bury
it. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

logger = logging.getLogger(__name__)


class ExpectedError(Exception):
    """A failure the user can fix; the message names the key, file, store or credential, and the fix."""


class DataError(ExpectedError, RuntimeError):
    """Input data that is missing, malformed or unreachable; the message names the file and the fix."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's `main`: an expected error ends it with its message on stderr and exit status 1."""
    try:
        main()
    except ExpectedError as err:
        logger.error("%s", err)
        sys.exit(1)
