"""Running the real `dvc` CLI (and git) on a copy of this project, for the end-to-end tests: every command with fake
credentials in its environment, none of which may show up in what it prints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

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


def run(cwd: Path, *args: str, check: bool = True, stdout_only: bool = False) -> str:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        **SECRETS,
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert not any(secret in (result.stdout + result.stderr).encode() for secret in SECRET_VALUES), args
    if check:
        assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout if stdout_only else result.stdout + result.stderr


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
    """A copy of the reproduced repository, git history and DVC cache included, to change freely. Its MLflow store
    starts empty: MLflow records where artifacts go as an absolute path, which a copied store would still point to
    the original's `mlartifacts/`."""
    shutil.copytree(repo, destination, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    return destination
