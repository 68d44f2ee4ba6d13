"""MLflow tracking: where runs are stored and what every stage's run carries."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow

from medgemma_breakhis.params import Params, to_flat_dict

EXPERIMENT_NAME = "medgemma-breakhis"


def main_repo_root() -> Path:
    """The repository's own root, also from inside `dvc exp run --temp/--queue` (which runs in .dvc/tmp/exps/…)."""
    root = Path(os.environ.get("DVC_ROOT", Path.cwd())).resolve()
    parts = root.parts
    for index in range(len(parts) - 2):
        if parts[index:index + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:index])
    return root


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set (a team server), else an embedded store at the repository root.

    An absolute path, because MLflow's default `sqlite:///mlflow.db` is relative to the working directory, and
    DVC's temporary experiment copies would each get their own store.
    """
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{main_repo_root() / 'mlflow.db'}"


def _git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else "no-git-commit"


@contextmanager
def stage_run(stage: str, params: Params) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one stage, with all resolved params and the tags that tie it to its origin."""
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(EXPERIMENT_NAME)
    tags = {
        "stage": stage,
        "git_commit": _git_commit(),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "workspace"),
        "model_id": params.model.id,
        "model_revision": params.model.revision,
    }
    with mlflow.start_run(run_name=stage, tags=tags) as run:
        mlflow.log_params(to_flat_dict(params))
        yield run
