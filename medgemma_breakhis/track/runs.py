"""MLflow runs: a parent per pipeline execution, a child per stage (docs/design.md#tracking-at-the-stage-boundary)."""

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import psutil
import torch
from matplotlib.figure import Figure
from mlflow.entities import Metric, Param, Run, RunTag
from ruamel.yaml import YAML

from medgemma_breakhis.core.errors import ParamsChangedError, ParamsError
from medgemma_breakhis.core.files import atomic_write_json, sha256
from medgemma_breakhis.core.logs import redacted, shown_uri
from medgemma_breakhis.core.params import Params, dotted_get, load_params
from medgemma_breakhis.core.stage import dvc_process, dvc_set_params
from medgemma_breakhis.track.store import (
    check_sqlite_writable,
    experiment_id,
    refused_unless_store_answers,
    sqlite_path,
    tracking_uri,
)

logger = logging.getLogger(__name__)
PARAMS_DIGEST_TAG = "params_digest"  # on the parent run: params.yaml's digest when the pipeline execution began
TRACKED_DISTRIBUTIONS = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "mlflow", "dvc")
SQLITE_PROBE_TIMEOUT_S = 1.0  # after a failed write, a last write's wait on a locked sqlite store (MLflow's: 20 s)
GIB = 2**30


def _git(*args: str) -> str | None:
    result = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "cuda": torch.version.cuda or "none"}
    for name in TRACKED_DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # e.g. mlflow installed as mlflow-skinny
            versions[name] = "not installed"
    return versions


def origin_tags() -> dict[str, str]:
    """Tags that tie a run to its code and its pipeline execution (whose stages share their `dvc` process)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    process = dvc_process() or psutil.Process()
    experiment = hashlib.sha256(os.environ.get("DVC_EXP_NAME", "workspace").encode()).hexdigest()[:12]  # any quote
    return {
        "git_commit": os.environ.get("DVC_EXP_BASELINE_REV") or _git("rev-parse", "HEAD") or "not a git repository",
        "git_dirty": "unknown" if status is None else str(bool(status)).lower(),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "workspace"),
        "pipeline_key": f"{experiment}:{socket.gethostname()}:{process.pid}:{process.create_time()}",
        **{f"version.{name}": version for name, version in library_versions().items()},
    }


def peak_memory_gib() -> dict[str, float]:
    """This process's peak RSS and, on GPUs, its peak CUDA memory allocated and reserved (summed)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    peaks = {"peak_process_rss_gib": rss / GIB}
    if torch.cuda.is_available():
        devices = range(torch.cuda.device_count())
        peaks["peak_cuda_memory_allocated_gib"] = sum(map(torch.cuda.max_memory_allocated, devices)) / GIB
        peaks["peak_cuda_memory_reserved_gib"] = sum(map(torch.cuda.max_memory_reserved, devices)) / GIB
    return peaks


def dvc_locked_md5(out: Path) -> str | None:
    """DVC's hash of output `out` in the lock file of the pipeline that made it (dvc.lock, cv/dvc.lock), if any."""
    for lock_file in (Path("dvc.lock"), *sorted(Path().glob("*/dvc.lock"))):
        stages = (YAML(typ="safe").load(lock_file) or {}).get("stages", {}) if lock_file.is_file() else {}
        for entry in (entry for stage in stages.values() for entry in stage.get("outs", [])):
            if Path(entry["path"]) == out:
                return entry.get("md5")
    return None


def params_digest(path: Path = Path("params.yaml")) -> str:
    """A digest of the values of params.yaml but `execution` (a comment or a layout changes nothing)."""
    if not path.is_file():
        return "absent"
    try:
        values = load_params(path).model_dump(mode="json", exclude={"execution"})
    except ParamsError as err:
        return f"invalid ({err})"
    return "sha256:" + hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def changed_since(digest: str, asked: dict[str, Any], path: Path = Path("params.yaml")) -> str | None:
    """Why `path` is not what a stage started from: another digest, or a value other than `dvc exp run -S` asked."""
    if params_digest(path) != digest:
        return f"{path} changed while this stage ran"
    raw = YAML(typ="safe").load(path.read_text(encoding="utf-8")) if asked else {}
    for key, value in asked.items():
        if (now := dotted_get(raw, key)) != value:
            return f"{path} has {key}={now!r:.100}, but dvc exp run was asked for {key}={value!r:.100}"
    return None


def refuse_changed_params(digest: str, asked: dict[str, Any], since: str) -> None:
    if (problem := changed_since(digest, asked)) is not None:
        raise ParamsChangedError(
            f"{problem} (since {since}): another `dvc exp run` in this workspace, which writes its -S values there "
            "before it waits for DVC's lock, or an edit. This stage's results would be recorded under params they "
            "were not made with, so none are. Run experiments side by side with `dvc exp run --queue` (then "
            "`dvc queue start`) or `--temp`, each in its own copy of the workspace; restore params.yaml and run again."
        )


def untracked_record(metrics_path: Path) -> Path:
    """Where a stage lists what it could not write to MLflow: beside its metrics, e.g. metrics/train.untracked.json."""
    return metrics_path.with_name(f"{metrics_path.stem}.untracked.json")


def _sqlite_still_locked() -> bool:
    try:
        if (path := sqlite_path(mlflow.get_tracking_uri())) is not None:
            check_sqlite_writable(path, SQLITE_PROBE_TIMEOUT_S)
        return False
    except Exception:  # noqa: BLE001 - locked, or worse: either way the store will not take the write now
        return True


@dataclass
class StageRun:
    """A stage's MLflow run: what the stage records during its work, written by `end`."""

    run_id: str
    parent_run_id: str
    record: Path  # where what could not be written is listed: a DVC output of the stage
    params_digest: str = "absent"
    requested: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)  # per-step metrics the store must end up holding
    artifacts: list[tuple[Path, str]] = field(default_factory=list)  # (file, artifact folder)
    figures: dict[str, Figure] = field(default_factory=dict)
    then: list[tuple[str, Callable[[], object]]] = field(default_factory=list)  # last writes, e.g. a registration
    parent_tags: dict[str, str] = field(default_factory=dict)
    parent_metrics: dict[str, float] = field(default_factory=dict)  # the pipeline's headline, on its parent run

    def refuse_if_params_changed(self) -> None:
        refuse_changed_params(self.params_digest, self.requested, "this stage began")

    def log_step(self, metrics: dict[str, float], step: int) -> None:
        """Per-step metrics, logged asynchronously (`end` writes again what the store drops)."""
        batch = [Metric(key, float(value), int(time.time() * 1000), step) for key, value in metrics.items()]
        mlflow.MlflowClient().log_batch(self.run_id, metrics=batch, synchronous=False)

    def _restore_history(self) -> None:
        """Log every (metric, step) of `history` the store lacks: MLflow's asynchronous logger drops failed batches."""
        mlflow.flush_async_logging()
        client = mlflow.MlflowClient()
        numbers = [(entry["step"], k, v) for entry in self.history for k, v in entry.items() if k != "step"]
        wanted = [(k, v, step) for step, k, v in numbers if isinstance(v, (int, float)) and not isinstance(v, bool)]
        held = {key: {m.step for m in client.get_metric_history(self.run_id, key)} for key in {k for k, _, _ in wanted}}
        now = int(time.time() * 1000)
        missing = [Metric(key, float(value), now, step) for key, value, step in wanted if step not in held[key]]
        if missing:
            logger.warning("the MLflow store had dropped %d logged value(s); logging them again", len(missing))
            client.log_batch(self.run_id, metrics=missing)

    def end(self, status: str) -> None:
        """Write what was recorded, then end both runs; after a failure only the last writes (tag, ends) are tried."""
        client, failures, now = mlflow.MlflowClient(), [], int(time.time() * 1000)

        def attempt(what: str, call: Callable[..., object], *args: Any, last: bool = False, **kwargs: Any) -> bool:
            if failures and not last:
                failures.append(f"{what}: not attempted, the store had failed before")
            elif failures and _sqlite_still_locked():
                failures.append(f"{what}: not attempted, the store is still locked")
            else:
                try:
                    call(*args, **kwargs)
                    return True
                except Exception as err:  # noqa: BLE001 - whatever the store raises (SQL, HTTP, disk), the results stay
                    uri = mlflow.get_tracking_uri()
                    reason = f"{type(err).__name__}: {redacted(str(err), uri)}"
                    logger.warning("could not track %s in MLflow (%s): %s", what, shown_uri(uri), reason)
                    failures.append(f"{what}: {reason}"[:1000])
                    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
            return False

        if self.tags:
            attempt("the tags", lambda: client.log_batch(self.run_id, tags=[RunTag(*tag) for tag in self.tags.items()]))
        if self.metrics:
            metrics = [Metric(key, float(value), now, 0) for key, value in self.metrics.items()]
            attempt("the metrics", client.log_batch, self.run_id, metrics=metrics)
        if self.history:
            attempt("the training metrics (loss, learning rate, gradient norm per step)", self._restore_history)
        for path, folder in self.artifacts:
            attempt(f"the artifact {path}", client.log_artifact, self.run_id, str(path), folder)
        for name, figure in self.figures.items():
            attempt(f"the figure {name}", client.log_figure, self.run_id, figure, name)
        if self.parent_tags or self.parent_metrics:
            tags = [RunTag(key, value) for key, value in self.parent_tags.items()]
            metrics = [Metric(key, float(value), now, 0) for key, value in self.parent_metrics.items()]
            parent = functools.partial(client.log_batch, self.parent_run_id, metrics=metrics, tags=tags)
            attempt("the pipeline run's metrics and tags", parent)
        for what, call in self.then:
            attempt(what, call)
        note = f"{len(failures)} item(s) not tracked, listed in {self.record}"
        tag = functools.partial(client.set_tag, self.run_id, "tracking_incomplete", note)
        marked = not failures or attempt("the tracking_incomplete tag", tag, last=True)
        ended = status if marked else "FAILED"
        attempt("the end of the stage's run", client.set_terminated, self.run_id, ended, last=True)
        attempt("the end of the pipeline's run", client.set_terminated, self.parent_run_id, status, last=True)
        if status != "FINISHED":  # a stage that failed writes no output: DVC records nothing of it
            return
        shown = {"tracking_uri": shown_uri(mlflow.get_tracking_uri()), "run_id": self.run_id} if failures else {}
        atomic_write_json(self.record, {**shown, "not_tracked": failures})
        if failures:
            logger.warning("%d item(s) could not be tracked in MLflow, listed in %s", len(failures), self.record)


def _pipeline_run(
    client: mlflow.MlflowClient, experiment: str, origin: dict[str, str], params: Params, requested: dict[str, Any]
) -> Run:
    """The parent run of this pipeline execution, found by its key or created with all params; running."""
    query = f"tags.pipeline_key = '{origin['pipeline_key']}' and tags.run_kind = 'pipeline'"
    if found := client.search_runs([experiment], query):
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0]
    changed = ", ".join(f"{key}={value}" for key, value in requested.items()) or "none"
    note = f"DVC experiment {origin['dvc_exp_name']} at git {origin['git_commit'][:12]}; changed params: {changed}"
    tags = {**origin, "run_kind": "pipeline", PARAMS_DIGEST_TAG: params_digest(), "mlflow.note.content": note}
    run = client.create_run(experiment, tags=tags, run_name=origin["dvc_exp_name"])
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.flat().items()])
    return client.get_run(run.info.run_id)


@contextlib.contextmanager
def tracked_run(stage: str, params: Params, split_csv: Path, record: Path) -> Iterator[StageRun]:
    """The stage's child run under its pipeline's run, ending FINISHED, or FAILED or KILLED with the reason as a tag."""
    try:  # the values the `dvc exp run` running this stage was asked to write into params.yaml
        requested = dvc_set_params(dvc.cmdline()) if (dvc := dvc_process()) is not None else {}
    except psutil.Error:  # dvc is gone: the stage is being stopped anyway
        requested = {}
    digest = params_digest()
    refuse_changed_params(digest, requested, "this stage began")  # a dvc exp run's -S values, overwritten
    experiment, origin, client = experiment_id(), origin_tags(), mlflow.MlflowClient()
    with refused_unless_store_answers(tracking_uri()):
        parent = _pipeline_run(client, experiment, origin, params, requested)
        first = parent.data.tags.get(PARAMS_DIGEST_TAG, digest)
        refuse_changed_params(first, requested, "this pipeline execution's first stage began")
        tags = {
            **origin,
            "mlflow.parentRunId": parent.info.run_id,
            "run_kind": "stage",
            "stage": stage,
            "data_split_file": split_csv.name,
            "data_split_sha256": sha256(split_csv),
            "model_id": params.model.id,
            "model_revision": params.model.revision,
        }
        name = f"{stage} fold{params.split.fold} {params.split.magnification}x"
        child = client.create_run(experiment, tags=tags, run_name=name).info.run_id
        try:
            client.log_batch(child, params=[Param(k, str(v)) for k, v in params.flat().items()])
        except Exception:
            with contextlib.suppress(Exception):  # the store is failing already: the first error is the one reported
                client.set_terminated(child, "FAILED")
            raise
    run = StageRun(child, parent.info.run_id, record, digest, requested)
    status = "FINISHED"
    try:
        yield run
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        run.tags["failure_reason"] = reason = f"{type(err).__name__}: {err}"[:4000]  # MLflow caps tag values
        run.parent_tags["failure_reason"] = f"{stage}: {reason}"
        raise
    finally:
        run.metrics |= peak_memory_gib()
        run.end(status)


def tag_train_run(parent_run_id: str, adapter_dir: Path, tags: dict[str, str]) -> None:
    """Put `tags` on the finished `train` run of this pipeline execution that wrote `adapter_dir`."""
    query = f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.stage = 'train'"  # no path: it may hold a quote
    client = mlflow.MlflowClient()
    for run in client.search_runs([experiment_id()], query, order_by=["attributes.start_time DESC"]):
        if run.data.tags.get("adapter_path") == str(adapter_dir):
            if run.info.status == "FINISHED":
                client.log_batch(run.info.run_id, tags=[RunTag(key, value) for key, value in tags.items()])
            return
