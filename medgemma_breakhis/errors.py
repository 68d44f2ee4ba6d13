"""Expected errors, and how a stage reports them: one message that names what to fix, no traceback.

An expected error is one the user causes and can fix (a param, the data, a model that does not load, missing
credentials, an unreachable tracking store); its message already says what to change, so a traceback would only bury
it. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Callable

logger = logging.getLogger(__name__)

# What a stopped stage exits with, as a shell reports a process ended by SIGINT.
INTERRUPTED_EXIT_STATUS = 130


class ExpectedError(Exception):
    """A failure the user can fix; the message names the key, file, store or credential, and the fix."""


class DataError(ExpectedError, RuntimeError):
    """Input data that is missing, malformed or unreachable; the message names the file and the fix."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's `main`: an expected error ends it with its message on stderr and exit status 1; a stop (Ctrl-C,
    SIGTERM, train's checkpoint-and-stop) with what stopped it and status 130; a full disk with the file that did not
    fit. None of these is a bug, so none prints a traceback; every output is written atomically, so nothing partial
    is left either way."""
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
