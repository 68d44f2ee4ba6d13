"""MLflow tracking: where runs are stored, how one pipeline execution is grouped, and what every run carries.

Each of `baseline`, `train` and `evaluate` is a child run of one parent run per pipeline execution (one `dvc repro`,
or one DVC experiment), so the MLflow UI shows an execution as one expandable row.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import psutil
import torch
from mlflow.entities import Run
from ruamel.yaml import YAML

from medgemma_breakhis.modeling import LoadedModelInfo
from medgemma_breakhis.params import Params, to_flat_dict
from medgemma_breakhis.repository import file_sha256, main_repo_root

EXPERIMENT_NAME = "medgemma-breakhis"
# The distributions whose versions decide the numbers; recorded as `version.<name>` tags.
TRACKED_DISTRIBUTIONS = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "mlflow", "dvc")


def embedded_tracking_uri() -> str:
    """The embedded store at the repository root.

    An absolute path, because MLflow's default `sqlite:///mlflow.db` is relative to the working directory, and
    DVC's temporary experiment copies would each get their own store.
    """
    return f"sqlite:///{main_repo_root() / 'mlflow.db'}"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set (a team server), else the embedded store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or embedded_tracking_uri()


def experiment_id() -> str:
    """The id of the `medgemma-breakhis` experiment, created on first use.

    With the embedded store, artifacts go to `mlartifacts/` at the repository root: MLflow's default artifact
    location is relative to the working directory, which for `--temp` runs is a copy DVC deletes afterwards.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)  # which also exports MLFLOW_TRACKING_URI
    experiment = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
    if experiment is not None:
        return experiment.experiment_id
    location = (main_repo_root() / "mlartifacts").as_uri() if uri == embedded_tracking_uri() else None
    return mlflow.create_experiment(EXPERIMENT_NAME, artifact_location=location)


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
    return f"{os.environ.get('DVC_EXP_NAME', 'workspace')}:{socket.gethostname()}:{process.pid}:{process.create_time()}"


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    versions |= {name: importlib.metadata.version(name) for name in TRACKED_DISTRIBUTIONS}
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
    mlflow.set_tags({
        "model_resolved_revision": info.resolved_revision,
        "device": info.device,
        "device_name": device_name(),
        "weights_dtype": info.dtype,
        "precision_ran": precision_ran,
    })


def log_peak_memory() -> None:
    """Peak memory of this process: resident set size, and CUDA memory allocated by torch when on a GPU."""
    # ru_maxrss is in kibibytes on Linux and in bytes on macOS.
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    metrics = {"peak_process_rss_gib": peak_rss / 2**30}
    if torch.cuda.is_available():
        metrics["peak_cuda_memory_allocated_gib"] = sum(
            torch.cuda.max_memory_allocated(index) for index in range(torch.cuda.device_count())) / 2**30
    mlflow.log_metrics(metrics)


@contextmanager
def stage_run(stage: str, params: Params, split_csv: Path) -> Iterator[mlflow.ActiveRun]:
    """A child MLflow run for one stage, under its pipeline execution's parent run.

    It carries all resolved params and the origin tags. A failure ends both runs FAILED, an interruption (Ctrl-C,
    SIGTERM) KILLED, with the reason as a tag.
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
    with (mlflow.start_run(run_id=parent),
          mlflow.start_run(experiment_id=experiment, nested=True, tags=tags,
                           run_name=f"{stage} (fold {params.split.fold}, {params.split.magnification}X)") as run):
        mlflow.log_params(to_flat_dict(params))
        try:
            yield run
        except BaseException as err:
            reason = f"{type(err).__name__}: {err}"[:4000]  # MLflow caps tag values
            mlflow.set_tag("failure_reason", reason)
            mlflow.MlflowClient().set_tag(parent, "failure_reason", f"{stage}: {reason}")
            log_peak_memory()
            if isinstance(err, KeyboardInterrupt):
                mlflow.end_run("KILLED")  # this stage's run
                mlflow.end_run("KILLED")  # the pipeline's
            raise
        log_peak_memory()


def pipeline_children(parent_run_id: str, stage: str, tags: dict[str, str]) -> list[Run]:
    """The runs of `stage` with `tags` under one pipeline execution's parent run, newest first."""
    wanted = "".join(f" and tags.{key} = '{value}'" for key, value in tags.items())
    return mlflow.search_runs(
        experiment_ids=[experiment_id()],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.stage = '{stage}'{wanted}",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
