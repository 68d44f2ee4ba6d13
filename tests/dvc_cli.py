"""Running the real `dvc` CLI (and git) on a copy of this project, for the end-to-end tests, and reading what the runs
left there (DVC's lock file, the MLflow store): every command with fake credentials in its environment, none of which
may show up in what it prints, nor anywhere in the repository (`assert_no_secret_kept`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
from mlflow.entities import Run
from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]
STAGES = ("download", "split_balance", "baseline", "train", "evaluate")
# Recognisable fake credentials in every command's environment; none may show up in anything the runs leave.
# Made at random so that this file, copied into the repository under test, does not contain them.
SECRETS = {
    "HF_TOKEN": f"hf_FAKE{uuid.uuid4().hex}",
    "KAGGLE_USERNAME": "fake-kaggle-user",
    "KAGGLE_KEY": f"FAKEKAGGLE{uuid.uuid4().hex}",
}
# The user name is no secret (and could match ordinary text); the token and the key are.
SECRET_VALUES = [value.encode() for key, value in SECRETS.items() if key != "KAGGLE_USERNAME"]


def run_json(cwd: Path, *args: str) -> dict:
    """A dvc command's --json output; its warnings on stderr (e.g. metrics of the cross-validation pipeline, not run
    yet) are not part of it."""
    return json.loads(run(cwd, *args, stdout_only=True))


def command_env() -> dict[str, str]:
    """The environment of every command: this Python's `dvc` first on PATH, offline, the fake credentials, and the
    repository's own MLflow store (none inherited from the shell that runs the tests)."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        **SECRETS,
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run(cwd: Path, *args: str, check: bool = True, stdout_only: bool = False, env: dict[str, str] | None = None) -> str:
    """`args` in `cwd` with `command_env` updated by `env`, its output checked for secrets."""
    env = command_env() | (env or {})
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert not any(secret in (result.stdout + result.stderr).encode() for secret in SECRET_VALUES), args
    if check:
        assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout if stdout_only else result.stdout + result.stderr


def experiments_shown(repo: Path) -> dict[str, dict]:
    """The named experiments `dvc exp show --json` lists in `repo`, by name: their params and metrics."""
    return {
        rev["name"]: rev["data"]
        for commit in run_json(repo, "dvc", "exp", "show", "--json")
        for exp in commit.get("experiments") or []
        for rev in exp["revs"]
        if rev.get("name")
    }


def stages_run(output: str) -> list[str]:
    return [stage for stage in STAGES if f"Running stage '{stage}'" in output]


def reproduced_repository(root: Path) -> Path:
    """A git repository of this project's tracked files in `root`, set to the offline profile (as `make demo`: only the
    magnification the split selects, 3 epochs), reproduced with `dvc repro` and committed."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in filter(None, tracked.stdout.split("\0")):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    yaml = YAML()
    params = yaml.load(root / "params.yaml")
    params["data"]["source"], params["model"]["id"] = "synthetic", "tiny-gemma3"
    params["data"]["synthetic"]["magnifications"], params["train"]["epochs"] = [100], 3
    yaml.dump(params, root / "params.yaml")
    run(root, "git", "init", "-q", "-b", "main")
    run(root, "git", "-c", "user.name=test", "-c", "user.email=test@example.com", "add", "-A")
    run(root, "git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "offline profile")
    output = run(root, "dvc", "repro")
    assert stages_run(output) == list(STAGES)
    run(root, "git", "add", "-A")
    run(root, "git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "results")
    return root


def copy_of(repo: Path, destination: Path) -> Path:
    """A copy of the reproduced repository, git history and DVC cache included, to change freely, without its MLflow
    store: MLflow records where artifacts go as an absolute path, which a copied store would still point to the
    original's `mlartifacts/`."""
    shutil.copytree(repo, destination, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    return destination


def clean_in_a_fresh_clone(repo: Path, tmp_path: Path, base: str = "HEAD") -> Path:
    """Push `repo`'s outputs to a local remote, clone it, and check that the commands of a teammate's (or a
    reviewer's, against `base`) first minutes exit 0 and print nothing on stderr; returns the clone."""
    remote, clone = tmp_path / "remote", tmp_path / "clone"
    run(repo, "dvc", "remote", "add", "--local", "-f", "-d", "shared", str(remote))  # --local: not in git
    run(repo, "dvc", "push")
    run(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    run(clone, "dvc", "remote", "add", "--local", "-d", "shared", str(remote))
    run(repo, "dvc", "remote", "remove", "--local", "shared")
    for command in (("pull",), ("checkout",), ("status",), ("metrics", "show"), ("metrics", "diff", base)):
        result = subprocess.run(
            ["dvc", *command],
            cwd=clone,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            env={
                **os.environ,
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                "DVC_NO_ANALYTICS": "1",
            },
        )
        assert (result.returncode, result.stderr) == (0, ""), f"dvc {' '.join(command)}: {result.stderr[-3000:]}"
    return clone


def mlflow_client(repo: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def search(repo: Path, filter_string: str) -> list[Run]:
    client = mlflow_client(repo)
    if (experiment := client.get_experiment_by_name("medgemma-breakhis")) is None:  # no stage ran here
        return []
    return client.search_runs([experiment.experiment_id], filter_string, order_by=["attributes.start_time ASC"])


def pipeline_group(repo: Path, dvc_exp_name: str) -> tuple[Run, dict[str, Run]]:
    """The parent run of one pipeline execution and its stage runs by stage."""
    (parent,) = search(repo, f"tags.run_kind = 'pipeline' and tags.dvc_exp_name = '{dvc_exp_name}'")
    children = search(repo, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return parent, {child.data.tags["stage"]: child for child in children}


def locked_md5(repo: Path, stage: str, out: str) -> str:
    lock = YAML(typ="safe").load(repo / "dvc.lock")
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == out)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def assert_no_secret_kept(repo: Path) -> None:
    """No file, git object or MLflow param or tag of `repo` holds a secret its commands ran with."""
    files = [path for path in repo.rglob("*") if path.is_file() and ".git" not in path.relative_to(repo).parts]
    for path in files:
        content = path.read_bytes()
        assert not any(secret in content for secret in SECRET_VALUES), path
    git_objects = subprocess.run(
        ["git", "cat-file", "--batch-all-objects", "--batch"], cwd=repo, capture_output=True, check=True
    ).stdout
    assert not any(secret in git_objects for secret in SECRET_VALUES)
    if (repo / "mlflow.db").is_file():  # a copy where no stage ran has none
        for run_ in search(repo, ""):
            recorded = json.dumps([run_.data.params, run_.data.tags]).encode()
            assert not any(secret in recorded for secret in SECRET_VALUES)
