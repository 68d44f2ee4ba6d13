"""Launch DVC experiments as SkyPilot managed jobs (cloud/task.yaml): one job per experiment, on a spot GPU.

Run (from the repository root, with the engine installed by `make cloud-setup`):
    make cloud-run ARGS='-S lora.r=16'                   # one experiment
    make cloud-sweep ARGS='-S lora.r=8,16,32'            # one job per value; several keys make a grid
    make cloud-sweep ARGS='-S split.fold=1,2,3,4,5'      # one job per cross-validation fold
    .venv-cloud/bin/python cloud/launch.py --dry-run -S lora.r=16   # check and print the jobs, launch nothing
Needs CLOUD_BUCKET=gs://bucket[/prefix] (checkpoints and the MLflow store), HEAD committed and pushed to `origin`,
and in the environment the credentials the params need: HF_TOKEN for a hub model, KAGGLE_USERNAME and KAGGLE_KEY
for data.source=kaggle. Results: `dvc exp pull origin <name>` then `dvc exp show` (README: Cloud GPU jobs).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
TASK_YAML = Path(__file__).resolve().parent / "task.yaml"
HF_SECRETS = ("HF_TOKEN",)
KAGGLE_SECRETS = ("KAGGLE_USERNAME", "KAGGLE_KEY")
# Passed along when set: a team MLflow server's credentials, a token for a private git repository.
OPTIONAL_SECRETS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "GIT_TOKEN")
# Model ids built locally, which need no Hugging Face token.
LOCAL_MODELS = ("tiny-gemma3",)


class LaunchError(RuntimeError):
    """A precondition of launching is not met; the message says which and how to fix it."""


def split_values(value: str) -> list[str]:
    """`8,16,32` into its values, DVC's sweep syntax; commas inside brackets belong to a list value (`[40,100]`)."""
    values, depth, current = [], 0, ""
    for char in value:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    return [*values, current]


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """The `-S key=value` overrides of every job: the grid over keys given several comma-separated values."""
    choices = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise LaunchError(f"-S {override}: expected key=value, e.g. -S lora.r=16")
        choices.append([f"{key}={v}" for v in split_values(value)])
    return [list(combination) for combination in itertools.product(*choices)]


def effective_value(params_yaml: str, overrides: list[str], key: str) -> Any:
    """`key` (section.name) as the experiment will see it: params.yaml at the commit, then the overrides."""
    for override in reversed(overrides):
        name, _, value = override.partition("=")
        if name.removeprefix("params.yaml:") == key:
            return yaml.safe_load(value)
    node: Any = yaml.safe_load(params_yaml)
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def needed_secrets(params_yaml: str, overrides: list[str]) -> list[str]:
    """The credentials the experiment's stages will ask for."""
    needed = []
    model = str(effective_value(params_yaml, overrides, "model.id"))
    if model not in LOCAL_MODELS and not model.startswith("/"):
        needed += HF_SECRETS
    if effective_value(params_yaml, overrides, "data.source") == "kaggle":
        needed += KAGGLE_SECRETS
    return needed


def secrets_for(params_yaml: str, overrides: list[str], environ: dict[str, str]) -> dict[str, str]:
    """The secrets to hand to the job, from `environ`; fails on the first one the params need that is not set."""
    for name in needed_secrets(params_yaml, overrides):
        if not environ.get(name):
            fix = (
                "accept MedGemma's terms on huggingface.co and `export HF_TOKEN=…`"
                if name == "HF_TOKEN"
                else "`export KAGGLE_USERNAME=… KAGGLE_KEY=…` (Kaggle → Settings → API)"
            )
            raise LaunchError(
                f"{name} is not set, and the experiment needs it ({' '.join(overrides) or 'params.yaml'}): {fix}"
            )
    names = (*HF_SECRETS, *KAGGLE_SECRETS, *OPTIONAL_SECRETS)
    return {name: environ[name] for name in names if environ.get(name)}


def task_config(envs: dict[str, str], secrets: dict[str, str], gpus: str | None = None, on_demand: bool = False) -> Any:
    """cloud/task.yaml with one job's variables and secrets filled in, validated by SkyPilot's own loader."""
    import sky  # the optional install: only what launches or validates needs it

    config = yaml.safe_load(TASK_YAML.read_text())
    # A declared secret left without a value would make SkyPilot look for a secrets provider: drop the unneeded ones.
    config["secrets"] = {name: None for name in config.get("secrets") or {} if name in secrets}
    task = sky.Task.from_yaml_config(config, env_overrides=list(envs.items()), secrets_overrides=list(secrets.items()))
    overrides: dict[str, Any] = {}
    if gpus:
        overrides["accelerators"] = gpus
    if on_demand:
        overrides["use_spot"] = False
    if overrides:
        task.set_resources_override(overrides)
    return task


def git(*args: str) -> str:
    result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else ""


def pushed_commit() -> tuple[str, str]:
    """(origin's URL, HEAD) once HEAD is committed and on origin: the job runs the commit, not this working tree."""
    url = git("remote", "get-url", "origin")
    if not url:
        raise LaunchError(
            "this repository has no `origin` remote: the job clones the commit from it and pushes the "
            "experiment back; `git remote add origin <url>`"
        )
    if git("status", "--porcelain", "--untracked-files=no"):
        raise LaunchError("uncommitted changes: the job runs a commit; commit them and push, or stash them")
    head = git("rev-parse", "HEAD")
    if not git("branch", "--remotes", "--contains", head):
        raise LaunchError(f"HEAD {head[:12]} is not on origin (as of the last fetch): `git push` it first")
    return url, head


def experiment_names(count: int, prefix: str | None) -> list[str]:
    """Unique names, valid as DVC experiment names and as SkyPilot job names."""
    prefix = prefix or "cloud-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if not re.fullmatch(r"[a-z][a-z0-9-]*", prefix):
        raise LaunchError(f"--name {prefix}: use lowercase letters, digits and '-', starting with a letter")
    return [prefix] if count == 1 else [f"{prefix}-{index}" for index in range(1, count + 1)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "-S",
        "--set-param",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a `dvc exp run -S` override; with --sweep, comma-separated values make one job each",
    )
    parser.add_argument("--sweep", action="store_true", help="one job per value (per combination of values)")
    parser.add_argument("--name", help="experiment name (a sweep appends -1, -2, …); default cloud-<date>-<time>")
    parser.add_argument("--gpus", help="SkyPilot accelerators instead of the task's L4:1, e.g. A100:1 or H100:1")
    parser.add_argument("--on-demand", action="store_true", help="on-demand instead of spot machines")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the jobs; launch nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        jobs = expand_sweep(args.overrides)
        if len(jobs) > 1 and not args.sweep:
            raise LaunchError("several values for one key make several jobs: use make cloud-sweep (--sweep)")
        bucket = os.environ.get("CLOUD_BUCKET", "")
        if not bucket.startswith("gs://"):
            raise LaunchError(
                "CLOUD_BUCKET is not set to a gs:// bucket: create one (README: Cloud GPU jobs) and "
                "`export CLOUD_BUCKET=gs://<bucket>/medgemma-breakhis`"
            )
        url, commit = pushed_commit()
        params_yaml = git("show", f"{commit}:params.yaml")
        tasks = []
        for name, overrides in zip(experiment_names(len(jobs), args.name), jobs):
            envs = {
                "REPO_URL": url,
                "REPO_COMMIT": commit,
                "EXP_NAME": name,
                "BUCKET": bucket,
                "EXP_ARGS": shlex.join(arg for override in overrides for arg in ("-S", override)),
                "DVC_REMOTE": os.environ.get("CLOUD_DVC_REMOTE", ""),
                "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", ""),
            }
            secrets = secrets_for(params_yaml, overrides, dict(os.environ))
            tasks.append((name, task_config(envs, secrets, args.gpus, args.on_demand), secrets))
    except LaunchError as err:
        sys.exit(f"cloud launch: {err}")

    import sky

    for name, task, secrets in tasks:
        resources = ", ".join(map(str, task.resources))
        logger.info(
            "%s: %s on %s, secrets %s",
            name,
            task.envs["EXP_ARGS"] or "(params.yaml)",
            resources,
            ", ".join(secrets) or "none",
        )
        if args.dry_run:
            continue
        sky.stream_and_get(sky.jobs.launch(task, name=name))
    if not args.dry_run:
        logger.info("follow: sky jobs queue; sky jobs logs <id>. Results: dvc exp pull origin <name>; dvc exp show")


if __name__ == "__main__":
    main()
