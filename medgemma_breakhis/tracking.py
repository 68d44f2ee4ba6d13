"""MLflow tracking: where runs are stored, how one pipeline execution is grouped, and what every run carries.

Each of `baseline`, `train` and `evaluate` is a child run of one parent run per pipeline execution (one `dvc repro`,
or one DVC experiment), so the MLflow UI shows an execution as one expandable row.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import mlflow
import psutil
import torch
from filelock import FileLock, Timeout
from matplotlib.figure import Figure
from mlflow.entities import Metric, Run
from mlflow.environment_variables import MLFLOW_RUN_ID
from mlflow.tracking import fluent
from ruamel.yaml import YAML

from medgemma_breakhis.atomic import atomic_write_json
from medgemma_breakhis.errors import ExpectedError
from medgemma_breakhis.logs import uri_credentials, without_user_info
from medgemma_breakhis.memory import peak_memory_gib
from medgemma_breakhis.modeling import LoadedModelInfo
from medgemma_breakhis.params import (
    Params,
    ParamsChangedError,
    changed_since,
    dvc_set_params,
    file_digest,
    to_flat_dict,
)
from medgemma_breakhis.repository import file_sha256, main_repo_root
from medgemma_breakhis.signals import dvc_process

logger = logging.getLogger(__name__)

EXPERIMENT_NAME = "medgemma-breakhis"
# The experiment kind MLflow 3 defines: a model-training experiment, not a GenAI one. (MLflow 3.17's UI picks its view
# by its own switch instead: `make mlflow-ui` prints the link that sets it.)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# The digest of params.yaml when a pipeline execution began, on its parent run: its later stages compare theirs.
PARAMS_DIGEST_TAG = "params_yaml_sha256"
# The distributions whose versions decide the numbers; recorded as `version.<name>` tags.
TRACKED_DISTRIBUTIONS = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "mlflow", "dvc")
# The store check before any heavy work: seconds per attempt, and MLflow's HTTP retries (default 7, minutes of
# backoff) turned off for it, so a dead store is reported within 15 s.
STORE_CHECK_TIMEOUT_S = 10
# How long a stage waits for another that is creating a new sqlite store: MLflow's schema migrations take seconds on an
# idle machine and tens of seconds on a busy one (queue workers starting together); the lock file is released when its
# holder exits, however it exits, so a long wait can only be for work under way.
FIRST_USE_LOCK_TIMEOUT_S = 180
# After a write to the embedded store has failed: how long a stage asks whether its lock is still held before each of
# its last writes (ending its runs), instead of MLflow's 20 s wait each.
SQLITE_PROBE_TIMEOUT_S = 1.0
# Every other request of a stage to a tracking server: MLflow's defaults (7 retries with exponential backoff, 120 s
# each) would hold a stage for minutes per call when the store fails mid-stage. Two retries, about 1 and 3 s later,
# ride out a passing fault; once a write has failed, none (`TrackedStage.track`). The user's own MLFLOW_HTTP_REQUEST_*
# settings are kept.
STORE_REQUEST_POLICY = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}


class TrackingError(ExpectedError):
    """The MLflow tracking store cannot be used; the message names it and the fix."""


def shown_uri(uri: str) -> str:
    """`uri` without its user name and password, and with the values of its query string masked, for messages."""
    parts = urlsplit(uri)
    if not parts.netloc:  # sqlite:////path, file:///path: nothing to hide, and rebuilding would drop a slash
        return uri
    parts = without_user_info(parts)
    if parts.query:
        parts = parts._replace(query="&".join(f"{key}=***" for key, _ in parse_qsl(parts.query, True)))
    return parts.geturl()


def redacted(text: str, uri: str) -> str:
    """`text` (an error from the store, which may quote its URL) without the credentials in `uri`."""
    for secret in uri_credentials(uri):
        text = text.replace(secret, "***")
    return text


def bound_store_requests() -> None:
    """Apply `STORE_REQUEST_POLICY` to this process's requests to the store (MLflow reads it per request), and move a
    user name and password in MLFLOW_TRACKING_URI to MLflow's own variables, which it sends as the same basic
    authentication: the URL that MLflow quotes in its errors and logs then carries no credential."""
    for name, value in STORE_REQUEST_POLICY.items():
        os.environ.setdefault(name, value)
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
    os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password or "")
    os.environ["MLFLOW_TRACKING_URI"] = without_user_info(parts).geturl()


def store_error(uri: str, err: Exception) -> TrackingError:
    """The one-line refusal for a store that failed before the stage's work: its name, the error, the fix; no
    credential of `uri` in any of it."""
    return TrackingError(
        f"MLflow tracking store {shown_uri(uri)} cannot be used: {type(err).__name__}: "
        f"{redacted(str(err), uri)}\n{_store_fix(uri)}"
    )


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ for the duration of the block, the previous values (or their absence) restored."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _store_fix(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        return (
            f"Check that {uri.removeprefix('sqlite:///')} is a writable MLflow database that no other process "
            "holds locked (an `mlflow ui` is fine; a copy in progress is not); a corrupt one can be moved aside, "
            "and MLflow creates a new one."
        )
    return (
        "Check that the server is up and reachable from here (MLFLOW_TRACKING_URI), and its credentials "
        "(MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD); or unset MLFLOW_TRACKING_URI to use the "
        "repository's own store, mlflow.db."
    )


def _check_sqlite_writable(path: Path, timeout: float = STORE_CHECK_TIMEOUT_S) -> None:
    """Take and release the write lock, as MLflow will: a locked, read-only or corrupt file fails here."""
    if not path.exists():
        if not os.access(path.parent, os.W_OK):
            raise PermissionError(f"{path.parent} is not writable, so {path.name} cannot be created")
        return
    connection = sqlite3.connect(path, timeout=timeout)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.rollback()
    finally:
        connection.close()


def check_tracking_store(uri: str) -> None:
    """Fail within seconds, naming the store and the fix, if MLflow cannot read and write `uri`: before the hours of
    work whose results it would record, not after."""
    started = time.monotonic()
    try:
        if uri.startswith("sqlite:///"):
            _check_sqlite_writable(Path(uri.removeprefix("sqlite:///")))
        # MLflow reads these per request; the stage's own requests get `STORE_REQUEST_POLICY` afterwards
        with _environment(
            {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(STORE_CHECK_TIMEOUT_S)}
        ):
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - any failure of the store (HTTP, SQL, file system) needs the same advice
        raise store_error(uri, err) from None  # the cause quotes the URI
    logger.debug("tracking store %s checked in %.1f s", shown_uri(uri), time.monotonic() - started)


def embedded_tracking_uri() -> str:
    """The embedded store at the repository root.

    An absolute path, because MLflow's default `sqlite:///mlflow.db` is relative to the working directory, and
    DVC's temporary experiment copies would each get their own store.
    """
    return f"sqlite:///{main_repo_root() / 'mlflow.db'}"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set (a team server), else the embedded store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or embedded_tracking_uri()


@contextmanager
def _first_use_lock(uri: str) -> Iterator[None]:
    """For a sqlite store, a lock file beside it: the stages of DVC's queue workers start together, and two processes
    creating a new store's tables (or the experiment) at once break each other's schema migration."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = FileLock(f"{uri.removeprefix('sqlite:///')}.lock")
    try:
        lock.acquire(timeout=FIRST_USE_LOCK_TIMEOUT_S)
    except Timeout:
        raise TrackingError(
            f"MLflow tracking store {shown_uri(uri)} cannot be used: another process has held "
            f"{lock.lock_file} for {FIRST_USE_LOCK_TIMEOUT_S} s\n{_store_fix(uri)}"
        ) from None
    try:
        yield
    finally:
        lock.release()


def experiment_id() -> str:
    """The id of the `medgemma-breakhis` experiment, created on first use as a model-training experiment (an existing
    one without a kind gets it; a kind set by hand is kept).

    With the embedded store, artifacts go to `mlartifacts/` at the repository root: MLflow's default artifact
    location is relative to the working directory, which for `--temp` runs is a copy DVC deletes afterwards.
    """
    bound_store_requests()
    uri = tracking_uri()
    with _first_use_lock(uri):
        check_tracking_store(uri)
        mlflow.set_tracking_uri(uri)  # which also exports MLFLOW_TRACKING_URI
        with refused_unless_store_answers(uri):
            experiment = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
            if experiment is not None:
                if EXPERIMENT_KIND_TAG not in experiment.tags:
                    mlflow.MlflowClient().set_experiment_tag(
                        experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
                    )
                return experiment.experiment_id
            location = (main_repo_root() / "mlartifacts").as_uri() if uri == embedded_tracking_uri() else None
            return mlflow.create_experiment(
                EXPERIMENT_NAME, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )


@contextmanager
def refused_unless_store_answers(uri: str) -> Iterator[None]:
    """MLflow calls made before the stage's work: a store that passed the check and fails now (a server that answers
    some requests and not others) stops the stage with the same one-line `TrackingError`, never a traceback that
    quotes the store's URL."""
    try:
        yield
    except TrackingError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever the store raises (HTTP, SQL), the same refusal
        raise store_error(uri, err) from None  # the cause quotes the URI


def _git(*args: str) -> str | None:
    result = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def pipeline_key() -> str:
    """Identifies one pipeline execution: the stages of one `dvc repro` or one experiment share the same `dvc` process.

    A stage run by hand, outside DVC, is an execution of its own.
    """
    process = dvc_process() or psutil.Process()
    # The experiment's name as a digest: the key is searched for, and a name (any git ref) may hold both quotes,
    # which an MLflow filter string cannot.
    experiment = hashlib.sha256(os.environ.get("DVC_EXP_NAME", "workspace").encode()).hexdigest()[:12]
    return f"{experiment}:{socket.gethostname()}:{process.pid}:{process.create_time()}"


def _installed_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        # e.g. mlflow installed as mlflow-skinny, or a stage run without dvc: the record says so, the stage goes on
        return "not installed"


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    versions |= {name: _installed_version(name) for name in TRACKED_DISTRIBUTIONS}
    versions["cuda"] = torch.version.cuda or "none"
    return versions


def origin_tags() -> dict[str, str]:
    """Tags that tie a run to the code and the DVC execution that produced it."""
    # Inside `dvc exp run --temp/--queue` HEAD is DVC's own commit; the experiment's base is DVC_EXP_BASELINE_REV.
    commit = os.environ.get("DVC_EXP_BASELINE_REV") or _git("rev-parse", "HEAD") or "not a git repository"
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": commit,
        "git_dirty": "unknown" if status is None else str(bool(status)).lower(),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "workspace"),
        "pipeline_key": pipeline_key(),
        **{f"version.{name}": version for name, version in library_versions().items()},
    }


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def dvc_locked_md5(out: Path) -> str | None:
    """DVC's hash of output `out`, as recorded in the lock file of the pipeline that made it (dvc.lock, cv/dvc.lock);
    None if no stage has been locked with it."""
    for lock_file in (Path("dvc.lock"), *sorted(Path().glob("*/dvc.lock"))):
        if not lock_file.is_file():
            continue
        lock = YAML(typ="safe").load(lock_file) or {}
        for stage in lock.get("stages", {}).values():
            for entry in stage.get("outs", []):
                if Path(entry["path"]) == out:
                    return entry.get("md5")
    return None


def _pipeline_run(experiment: str, origin: dict[str, str], params: Params, params_digest: str) -> tuple[str, str]:
    """The parent run of this pipeline execution, found by its key or created by the execution's first stage; and the
    digest of params.yaml that it recorded when it began."""
    found = mlflow.search_runs(
        experiment_ids=[experiment],
        filter_string=f"tags.pipeline_key = '{origin['pipeline_key']}' and tags.run_kind = 'pipeline'",
        output_format="list",
    )
    if found:
        return found[0].info.run_id, found[0].data.tags.get(PARAMS_DIGEST_TAG, params_digest)
    run_name = origin["dvc_exp_name"] if "DVC_EXP_NAME" in os.environ else "workspace"
    tags = {**origin, "run_kind": "pipeline", PARAMS_DIGEST_TAG: params_digest}
    with mlflow.start_run(experiment_id=experiment, run_name=run_name, tags=tags) as run:
        mlflow.log_params(to_flat_dict(params))
    return run.info.run_id, params_digest


def params_requested_from_dvc() -> dict[str, Any]:
    """The values that the `dvc exp run` running this stage was asked to write into params.yaml (`-S`)."""
    dvc = dvc_process()
    try:
        return dvc_set_params(dvc.cmdline()) if dvc is not None else {}
    except psutil.Error:  # dvc is gone: the stage is being stopped anyway (signals.stop_when_dvc_exits)
        return {}


def refuse_changed_params(digest: str, asked: dict[str, Any], since: str) -> None:
    """ParamsChangedError if params.yaml is no longer what the stage started from (see `params.changed_since`)."""
    problem = changed_since(digest, asked)
    if problem is None:
        return
    raise ParamsChangedError(
        f"{problem} (since {since}): another `dvc exp run` in this workspace, which writes its -S values there "
        "before it waits for DVC's lock, or an edit. This stage's results would be recorded under params they "
        "were not made with, so none are. Run experiments side by side with `dvc exp run --queue` (then "
        "`dvc queue start`) or `--temp`, each in its own copy of the workspace; restore params.yaml and run again."
    )


def loaded_model_tags(info: LoadedModelInfo, precision_ran: str) -> dict[str, str]:
    """Tags of what was actually loaded and how it computed: never the requested precision, the one that ran."""
    return {
        "model_resolved_revision": info.resolved_revision,
        "device": info.device,
        "device_name": device_name(),
        "weights_dtype": info.dtype,
        "precision_ran": precision_ran,
    }


def untracked_record(metrics_path: Path) -> Path:
    """Where a stage lists what it could not write to MLflow: beside its metrics, e.g. metrics/train.untracked.json."""
    return metrics_path.with_name(f"{metrics_path.stem}.untracked.json")


def _forget_active_run() -> None:
    """Pop MLflow's active run without a request to the store, as mlflow.end_run does before its own write; MLflow
    has no public call for it. In-process callers (tests, notebooks) can then start another run."""
    MLFLOW_RUN_ID.unset()
    fluent._active_run_stack.get().pop()


@dataclass
class TrackedStage:
    """A stage's MLflow run once its work has started: from then on the store failing costs the record, never the
    results. What could not be tracked is logged, listed in `record` and, if the store lets it, tagged on the run."""

    run: mlflow.ActiveRun
    record: Path
    failures: list[str] = field(default_factory=list)
    params_digest: str = ""
    requested_params: dict[str, Any] = field(default_factory=dict)

    def refuse_if_params_changed(self) -> None:
        """Before the stage writes its results: ParamsChangedError if params.yaml changed since the stage began."""
        refuse_changed_params(self.params_digest, self.requested_params, "this stage began")

    def track(self, what: str, call: Callable[[], object], always: bool = False) -> bool:
        """`call` (an MLflow write); if it fails, a warning, and the stage goes on. Once one write has failed, the
        others are not attempted (each would wait out the store's timeout again) unless `always`, and then only
        while the store answers."""
        if self.failures and not always:
            self.failures.append(f"{what}: not attempted, the store had failed before")
            return False
        if self.failures and self._sqlite_still_locked():
            self.failures.append(f"{what}: not attempted, the store is still locked")
            return False
        try:
            call()
        except Exception as err:  # noqa: BLE001 - whatever the store raises (SQL, HTTP, disk): the work must not be lost to it
            uri = mlflow.get_tracking_uri()
            reason = f"{type(err).__name__}: {redacted(str(err), uri)}"
            logger.warning("could not track %s in MLflow (%s): %s", what, shown_uri(uri), reason)
            self.failures.append(f"{what}: {reason}"[:1000])
            # The store has failed once: each remaining write (ending the runs) gets one attempt, not retries.
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
            return False
        return True

    @staticmethod
    def _sqlite_still_locked() -> bool:
        """For the embedded store: whether its write lock is still held elsewhere, asked in a second. MLflow waits
        20 s on a locked sqlite file before each write fails, which a stage's last writes would otherwise add up."""
        uri = mlflow.get_tracking_uri()
        if not uri.startswith("sqlite:///"):
            return False
        try:
            _check_sqlite_writable(Path(uri.removeprefix("sqlite:///")), timeout=SQLITE_PROBE_TIMEOUT_S)
        except sqlite3.Error:
            return True
        return False

    def end_runs(self, stage: str, pipeline: str) -> None:
        """End the stage's run and its pipeline's with these statuses, also after a failure (one attempt each).
        Neither stays active in this process either way: mlflow.end_run pops the active run before its write, and
        an end not attempted (the store still locked) pops it without one."""
        for what, status in (("the end of the stage's run", stage), ("the end of the pipeline's run", pipeline)):
            active = mlflow.active_run()
            self.track(what, functools.partial(mlflow.end_run, status), always=True)
            if active is not None and mlflow.active_run() is active:
                _forget_active_run()

    def metrics(self, what: str, values: dict[str, float]) -> bool:
        return self.track(what, functools.partial(mlflow.log_metrics, values))

    def tags(self, what: str, values: dict[str, str]) -> bool:
        return self.track(what, functools.partial(mlflow.set_tags, values))

    def artifact(self, path: Path, folder: str) -> bool:
        """The file `path` as an artifact in `folder` of the run."""
        return self.track(f"the artifact {path}", functools.partial(mlflow.log_artifact, str(path), folder))

    def figure(self, what: str, figure: Figure, name: str) -> bool:
        """A matplotlib figure as the image `name` of the run."""
        return self.track(what, functools.partial(mlflow.log_figure, figure, name))

    def restore_metrics(self, history: list[dict[str, float]]) -> None:
        """Log every (metric, step) of `history` (the trainer's log history) that the store does not hold.

        The trainer's MLflow callback logs asynchronously, and MLflow drops a batch that fails with only an ERROR
        line: what the store lacks at the end is written again here, or reported as not tracked."""

        def restore() -> None:
            mlflow.flush_async_logging()
            client, run_id = mlflow.MlflowClient(), self.run.info.run_id
            wanted = [
                (key, value, entry["step"])
                for entry in history
                for key, value in entry.items()
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
            ]
            held = {key: {m.step for m in client.get_metric_history(run_id, key)} for key in {k for k, _, _ in wanted}}
            missing = [
                Metric(key, float(value), int(time.time() * 1000), step)
                for key, value, step in wanted
                if step not in held[key]
            ]
            if missing:
                logger.warning(
                    "the MLflow store had dropped %d logged value(s) of run %s (first: %s at step %d); "
                    "logging them again",
                    len(missing),
                    run_id,
                    missing[0].key,
                    missing[0].step,
                )
                client.log_batch(run_id, metrics=missing)

        self.track("the training metrics (loss, learning rate, gradient norm per step)", restore)

    def end(self) -> None:
        """End the stage's and the pipeline's runs, then write `record`, a DVC output of the stage, so that it travels
        with the stage's results (into `--temp`, queued and cloud experiments too): empty when everything was tracked,
        else the store, the run and each item not tracked. With anything untracked, the run is tagged
        `tracking_incomplete`, or ends FAILED where even the tag cannot be written: never FINISHED and unmarked."""
        incomplete = f"{len(self.failures)} item(s) not tracked, listed in {self.record}"
        marked = not self.failures or self.track(
            "the tracking_incomplete tag", functools.partial(mlflow.set_tag, "tracking_incomplete", incomplete), True
        )
        self.end_runs(stage="FINISHED" if marked else "FAILED", pipeline="FINISHED")
        if not self.failures:
            atomic_write_json(self.record, {"not_tracked": []})
            return
        atomic_write_json(
            self.record,
            {
                "tracking_uri": shown_uri(mlflow.get_tracking_uri()),
                "run_id": self.run.info.run_id,
                "not_tracked": self.failures,
            },
        )
        logger.warning(
            "%d item(s) could not be tracked in MLflow, listed in %s; the stage's results are written all the same",
            len(self.failures),
            self.record,
        )


@contextmanager
def stage_run(stage: str, params: Params, split_csv: Path, record: Path) -> Iterator[TrackedStage]:
    """A child MLflow run for one stage, under its pipeline execution's parent run.

    It carries all resolved params and the origin tags. A failure ends both runs FAILED, an interruption (Ctrl-C,
    SIGTERM) KILLED, with the reason as a tag. The store is checked before the stage's work (TrackingError); once the
    work has started, MLflow writes go through `TrackedStage.track`, and ending the runs does too: a store failing
    then is a warning, listed in `record`. A run whose record is incomplete gets a `tracking_incomplete` tag or, if
    even that cannot be written, ends FAILED or stays RUNNING: it never looks complete.
    """
    params_digest, requested = file_digest(), params_requested_from_dvc()
    refuse_changed_params(params_digest, requested, "this stage began")  # a dvc exp run's -S values, overwritten
    experiment = experiment_id()
    origin = origin_tags()
    with refused_unless_store_answers(tracking_uri()):
        parent, pipeline_digest = _pipeline_run(experiment, origin, params, params_digest)
    refuse_changed_params(pipeline_digest, requested, "this pipeline execution's first stage began")
    tags = {
        **origin,
        "run_kind": "stage",
        "stage": stage,
        "data_split_file": split_csv.name,
        "data_split_sha256": file_sha256(split_csv),
        "model_id": params.model.id,
        "model_revision": params.model.revision,
    }
    with refused_unless_store_answers(tracking_uri()):
        mlflow.start_run(run_id=parent)
        try:
            run = mlflow.start_run(
                experiment_id=experiment,
                nested=True,
                tags=tags,
                run_name=f"{stage} (fold {params.split.fold}, {params.split.magnification}X)",
            )
            mlflow.log_params(to_flat_dict(params))
        except BaseException:
            _end_runs_after_failed_start()
            raise
    tracked = TrackedStage(run, record, params_digest=params_digest, requested_params=requested)
    try:
        yield tracked
    except BaseException as err:
        reason = f"{type(err).__name__}: {err}"[:4000]  # MLflow caps tag values
        tracked.tags("the failure reason", {"failure_reason": reason})
        tracked.track(
            "the failure reason of the pipeline run",
            functools.partial(mlflow.MlflowClient().set_tag, parent, "failure_reason", f"{stage}: {reason}"),
        )
        tracked.metrics("the peak memory", peak_memory_gib())
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        tracked.end_runs(stage=status, pipeline=status)
        raise
    tracked.metrics("the peak memory", peak_memory_gib())
    tracked.end()


def _end_runs_after_failed_start() -> None:
    """End what the failed start left active, FAILED, without letting a failing store hide the first error. Once an
    end has failed, the runs left are popped without a request (each would wait on the failing store again)."""
    while mlflow.active_run() is not None:
        try:
            mlflow.end_run("FAILED")
        except Exception as err:  # noqa: BLE001 - the store is failing already; the error that matters is raised
            logger.debug("could not end the run: %s", type(err).__name__)
            break
    while mlflow.active_run() is not None:
        _forget_active_run()


def pipeline_children(parent_run_id: str, stage: str, tags: dict[str, str]) -> list[Run]:
    """The runs of `stage` with `tags` under one pipeline execution's parent run, newest first."""
    # Only ids and stage names go into the filter string; tag values such as paths may hold any quote.
    runs = mlflow.search_runs(
        experiment_ids=[experiment_id()],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.stage = '{stage}'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    return [run for run in runs if tags.items() <= run.data.tags.items()]
