"""The MLflow tracking store: found, bounded and checked. Light: tools import it without the model libraries."""

import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager, nullcontext
from pathlib import Path
from unittest import mock
from urllib.parse import unquote, urlsplit

import mlflow
from filelock import FileLock, Timeout

from medgemma_breakhis.core.errors import ExpectedError
from medgemma_breakhis.core.files import main_repo_root
from medgemma_breakhis.core.logs import redacted, shown_uri, without_user_info

EXPERIMENT_NAME = "medgemma-breakhis"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # MLflow 3's UI picks its view by it
EXPERIMENT_KIND = "custom_model_development"
STORE_CHECK_TIMEOUT_S = 10  # per attempt of the store check before any work, with MLflow's HTTP retries off
FIRST_USE_LOCK_TIMEOUT_S = 180  # for another process creating a new sqlite store (tens of seconds when busy)
# Every other request to a server, instead of MLflow's 7 retries of up to 120 s each; a user's own settings are kept.
STORE_REQUEST_POLICY = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}


class TrackingError(ExpectedError):
    """The MLflow tracking store cannot be used; the message names it and the fix."""


def embedded_tracking_uri() -> str:
    """The store at the repository's root, also from DVC's experiment copies (MLflow's default is relative)."""
    return f"sqlite:///{main_repo_root() / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or embedded_tracking_uri()


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def bound_store_requests() -> None:
    """Apply `STORE_REQUEST_POLICY`; move MLFLOW_TRACKING_URI's credentials to MLflow's variables, out of its URLs."""
    for name, value in STORE_REQUEST_POLICY.items():
        os.environ.setdefault(name, value)
    parts = urlsplit(os.environ.get("MLFLOW_TRACKING_URI", ""))
    if parts.username is not None or parts.password is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password or "")
        os.environ["MLFLOW_TRACKING_URI"] = without_user_info(parts).geturl()


def check_sqlite_writable(path: Path, timeout: float) -> None:
    """Take and release the write lock, as MLflow will: a locked, read-only or corrupt file fails here."""
    if not path.exists():
        if not os.access(path.parent, os.W_OK):
            raise PermissionError(f"{path.parent} is not writable, so {path.name} cannot be created")
        return
    with closing(sqlite3.connect(path, timeout=timeout)) as connection:
        connection.execute("BEGIN IMMEDIATE")
        connection.rollback()


@contextmanager
def refused_unless_store_answers(uri: str) -> Iterator[None]:
    """Whatever the store raises becomes a TrackingError naming the store, the error and the fix, with no credential."""
    try:
        yield
    except ExpectedError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of the store (HTTP, SQL, file system) needs the same advice
        fix = (
            "Check that the server is up and reachable from here (MLFLOW_TRACKING_URI), and its credentials "
            "(MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD); or unset MLFLOW_TRACKING_URI to use "
            "the repository's own store, mlflow.db."
        )
        if (path := sqlite_path(uri)) is not None:
            fix = (
                f"Check that {path} is a writable MLflow database that no other process holds locked (an `mlflow ui` "
                "is fine; a copy in progress is not); a corrupt one can be moved aside, and MLflow creates a new one."
            )
        reason = f"{type(err).__name__}: {redacted(str(err), uri)}"  # raised without the cause, which quotes the URI
        raise TrackingError(f"MLflow tracking store {shown_uri(uri)} cannot be used: {reason}\n{fix}") from None


def check_tracking_store(uri: str) -> None:
    """TrackingError within seconds, naming the store and the fix, unless MLflow can read and write `uri`."""
    checking = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(STORE_CHECK_TIMEOUT_S)}
    with refused_unless_store_answers(uri), mock.patch.dict(os.environ, checking):  # MLflow reads them per request
        if (path := sqlite_path(uri)) is not None:
            check_sqlite_writable(path, STORE_CHECK_TIMEOUT_S)
        mlflow.MlflowClient(uri).search_experiments(max_results=1)


def open_store() -> mlflow.MlflowClient:
    """The store, bounded and checked, as MLflow's tracking URI of this process (and its children)."""
    bound_store_requests()
    uri = tracking_uri()
    check_tracking_store(uri)
    mlflow.set_tracking_uri(uri)  # which also exports MLFLOW_TRACKING_URI
    return mlflow.MlflowClient()


def experiment_id() -> str:
    """The experiment's id in the checked store, created on first use as a model-training experiment."""
    bound_store_requests()
    uri, path = tracking_uri(), sqlite_path(tracking_uri())
    # two processes creating a new sqlite store (queue workers) break each other's schema migration
    lock = FileLock(f"{path}.lock", timeout=FIRST_USE_LOCK_TIMEOUT_S) if path else nullcontext()
    try:
        with lock:
            client = open_store()
            with refused_unless_store_answers(uri):
                if (experiment := client.get_experiment_by_name(EXPERIMENT_NAME)) is None:
                    location = (main_repo_root() / "mlartifacts").as_uri() if uri == embedded_tracking_uri() else None
                    tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
                    return client.create_experiment(EXPERIMENT_NAME, artifact_location=location, tags=tags)
                if EXPERIMENT_KIND_TAG not in experiment.tags:
                    client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
                return experiment.experiment_id
    except Timeout:
        raise TrackingError(
            f"MLflow tracking store {shown_uri(uri)} cannot be used: another process has held {path}.lock for "
            f"{FIRST_USE_LOCK_TIMEOUT_S} s"
        ) from None
