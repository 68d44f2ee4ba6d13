"""MLflow tracking: where runs are stored, how one pipeline execution is grouped, and what every run carries.

Each of `baseline`, `train` and `evaluate` is a child run of one parent run per pipeline execution (one `dvc repro`,
or one DVC experiment), so the MLflow UI shows an execution as one expandable row.
"""

from __future__ import annotations

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
from unittest import mock
from urllib.parse import urlsplit

import mlflow
import psutil
import torch
from filelock import FileLock, Timeout
from mlflow.entities import Metric, Run
from ruamel.yaml import YAML

from medgemma_breakhis.atomic import atomic_write_json
from medgemma_breakhis.errors import ExpectedError
from medgemma_breakhis.memory import peak_memory_gib
from medgemma_breakhis.modeling import LoadedModelInfo
from medgemma_breakhis.params import Params, to_flat_dict
from medgemma_breakhis.repository import file_sha256, main_repo_root

logger = logging.getLogger(__name__)

EXPERIMENT_NAME = "medgemma-breakhis"
# The experiment kind MLflow 3 defines: a model-training experiment, not a GenAI one. (MLflow 3.17's UI picks its view
# by its own switch instead: `make mlflow-ui` prints the link that sets it.)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# The distributions whose versions decide the numbers; recorded as `version.<name>` tags.
TRACKED_DISTRIBUTIONS = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "mlflow", "dvc")
# The store check before any heavy work: seconds per attempt, and MLflow's HTTP retries (default 7, minutes of
# backoff) turned off for it, so a dead store is reported within 15 s.
STORE_CHECK_TIMEOUT_S = 10


class TrackingError(ExpectedError):
    """The MLflow tracking store cannot be used; the message names it and the fix."""


def shown_uri(uri: str) -> str:
    """`uri` without any user name or password in it, for messages and logs."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    return parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")).geturl()


def redacted(text: str, uri: str) -> str:
    """`text` (an error from the store, which may quote its URL) without the user name or password in `uri`."""
    parts = urlsplit(uri)
    for secret in filter(None, (parts.password, parts.username)):
        text = text.replace(secret, "***")
    return text


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


def _check_sqlite_writable(path: Path) -> None:
    """Take and release the write lock, as MLflow will: a locked, read-only or corrupt file fails here."""
    if not path.exists():
        if not os.access(path.parent, os.W_OK):
            raise PermissionError(f"{path.parent} is not writable, so {path.name} cannot be created")
        return
    connection = sqlite3.connect(path, timeout=STORE_CHECK_TIMEOUT_S)
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
        # MLflow reads these per request; the environment is restored afterwards, so the stage's own requests
        # keep MLflow's (or the user's) retries
        with mock.patch.dict(
            os.environ,
            {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(STORE_CHECK_TIMEOUT_S)},
        ):
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - any failure of the store (HTTP, SQL, file system) needs the same advice
        raise TrackingError(
            f"MLflow tracking store {shown_uri(uri)} cannot be used: {type(err).__name__}: "
            f"{redacted(str(err), uri)}\n{_store_fix(uri)}"
        ) from None  # the cause quotes the URI
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
        lock.acquire(timeout=STORE_CHECK_TIMEOUT_S)
    except Timeout:
        raise TrackingError(
            f"MLflow tracking store {shown_uri(uri)} cannot be used: another process has held "
            f"{lock.lock_file} for {STORE_CHECK_TIMEOUT_S} s\n{_store_fix(uri)}"
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
    uri = tracking_uri()
    with _first_use_lock(uri):
        check_tracking_store(uri)
        mlflow.set_tracking_uri(uri)  # which also exports MLFLOW_TRACKING_URI
        experiment = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
        if experiment is not None:
            if EXPERIMENT_KIND_TAG not in experiment.tags:
                mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return experiment.experiment_id
        location = (main_repo_root() / "mlartifacts").as_uri() if uri == embedded_tracking_uri() else None
        return mlflow.create_experiment(
            EXPERIMENT_NAME, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )


def _git(*args: str) -> str | None:
    result = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def _dvc_process() -> psutil.Process | None:
    """The `dvc` process this stage runs under (`dvc repro`, `dvc exp run`, a queue worker), if any."""
    for process in psutil.Process().parents():
        try:
            command = process.cmdline()
        except psutil.Error:
            continue
        if any(Path(arg).name in ("dvc", "dvc.exe") for arg in command[:3]):
            return process
    return None


def pipeline_key() -> str:
    """Identifies one pipeline execution: the stages of one `dvc repro` or one experiment share the same `dvc` process.

    A stage run by hand, outside DVC, is an execution of its own.
    """
    process = _dvc_process() or psutil.Process()
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


def _pipeline_run(experiment: str, origin: dict[str, str], params: Params) -> str:
    """The parent run of this pipeline execution: found by its key, or created by the execution's first stage."""
    found = mlflow.search_runs(
        experiment_ids=[experiment],
        filter_string=f"tags.pipeline_key = '{origin['pipeline_key']}' and tags.run_kind = 'pipeline'",
        output_format="list",
    )
    if found:
        return found[0].info.run_id
    run_name = origin["dvc_exp_name"] if "DVC_EXP_NAME" in os.environ else "workspace"
    with mlflow.start_run(experiment_id=experiment, run_name=run_name, tags={**origin, "run_kind": "pipeline"}) as run:
        mlflow.log_params(to_flat_dict(params))
    return run.info.run_id


def log_loaded_model(info: LoadedModelInfo, precision_ran: str) -> None:
    """Tags of what was actually loaded and how it computed: never the requested precision, the one that ran."""
    mlflow.set_tags(
        {
            "model_resolved_revision": info.resolved_revision,
            "device": info.device,
            "device_name": device_name(),
            "weights_dtype": info.dtype,
            "precision_ran": precision_ran,
        }
    )


def log_peak_memory() -> None:
    mlflow.log_metrics(peak_memory_gib())


def untracked_record(metrics_path: Path) -> Path:
    """Where a stage lists what it could not write to MLflow: beside its metrics, e.g. metrics/train.untracked.json."""
    return metrics_path.with_name(f"{metrics_path.stem}.untracked.json")


@dataclass
class TrackedStage:
    """A stage's MLflow run once its work has started: from then on the store failing costs the record, never the
    results. What could not be tracked is logged, listed in `record` and, if the store lets it, tagged on the run."""

    run: mlflow.ActiveRun
    record: Path
    failures: list[str] = field(default_factory=list)

    def track(self, what: str, call: Callable[[], object], always: bool = False) -> bool:
        """`call` (an MLflow write); if it fails, a warning, and the stage goes on. Once one write has failed, the
        others are not attempted (each would wait out the store's timeout again) unless `always`."""
        if self.failures and not always:
            self.failures.append(f"{what}: not attempted, the store had failed before")
            return False
        try:
            call()
        except Exception as err:  # noqa: BLE001 - whatever the store raises (SQL, HTTP, disk): the work must not be lost to it
            uri = mlflow.get_tracking_uri()
            reason = f"{type(err).__name__}: {redacted(str(err), uri)}"
            logger.warning("could not track %s in MLflow (%s): %s", what, shown_uri(uri), reason)
            self.failures.append(f"{what}: {reason}"[:1000])
            return False
        return True

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
        """End the stage's and the pipeline's runs; with anything untracked, write `record` and tag the run
        `tracking_incomplete`, or end it FAILED where even the tag cannot be written: never FINISHED and unmarked."""
        marked = True
        if self.failures:
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
            marked = self.track(
                "the tracking_incomplete tag",
                lambda: mlflow.set_tag(
                    "tracking_incomplete", f"{len(self.failures)} item(s) not tracked, listed in {self.record}"
                ),
                always=True,
            )
        else:
            self.record.unlink(missing_ok=True)  # from an earlier run of the stage
        status = "FINISHED" if marked else "FAILED"
        # Ending pops MLflow's active run before writing, so these leave no run active in this process either way.
        self.track("the end of the stage's run", lambda: mlflow.end_run(status), always=True)
        self.track("the end of the pipeline's run", mlflow.end_run, always=True)


@contextmanager
def stage_run(stage: str, params: Params, split_csv: Path, record: Path) -> Iterator[TrackedStage]:
    """A child MLflow run for one stage, under its pipeline execution's parent run.

    It carries all resolved params and the origin tags. A failure ends both runs FAILED, an interruption (Ctrl-C,
    SIGTERM) KILLED, with the reason as a tag. The store is checked before the stage's work (TrackingError); once the
    work has started, MLflow writes go through `TrackedStage.track`, and ending the runs does too: a store failing
    then is a warning, listed in `record`. A run whose record is incomplete gets a `tracking_incomplete` tag or, if
    even that cannot be written, ends FAILED or stays RUNNING: it never looks complete.
    """
    experiment = experiment_id()
    origin = origin_tags()
    parent = _pipeline_run(experiment, origin, params)
    tags = {
        **origin,
        "run_kind": "stage",
        "stage": stage,
        "data_split_file": split_csv.name,
        "data_split_sha256": file_sha256(split_csv),
        "model_id": params.model.id,
        "model_revision": params.model.revision,
    }
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
        mlflow.end_run("FAILED")
        raise
    tracked = TrackedStage(run, record)
    try:
        yield tracked
    except BaseException as err:
        reason = f"{type(err).__name__}: {err}"[:4000]  # MLflow caps tag values
        tracked.track("the failure reason", lambda: mlflow.set_tag("failure_reason", reason))
        tracked.track(
            "the failure reason of the pipeline run",
            lambda: mlflow.MlflowClient().set_tag(parent, "failure_reason", f"{stage}: {reason}"),
        )
        tracked.track("the peak memory", log_peak_memory)
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        tracked.track("the end of the stage's run", lambda: mlflow.end_run(status), always=True)
        tracked.track("the end of the pipeline's run", lambda: mlflow.end_run(status), always=True)
        raise
    tracked.track("the peak memory", log_peak_memory)
    tracked.end()


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
