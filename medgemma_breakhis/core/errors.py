"""Errors the user causes and can fix: the stage entry (`core.stage.stage_entry`) reports them in one line."""


class ExpectedError(Exception):
    """A failure the user can fix; the message names the key, file, store or credential, and the fix."""


class DataError(ExpectedError, RuntimeError):
    """Input data that is missing, malformed or unreachable; the message names the file and the fix."""


class ParamsError(ExpectedError):
    """A value in params.yaml that the pipeline cannot run with."""


class ParamsChangedError(ExpectedError):
    """params.yaml changed while a stage ran: its results would be recorded under params they were not made with."""
