"""Launch DVC experiments as SkyPilot managed jobs (cloud/task.yaml): one job per experiment, on a spot GPU.
Run (after `make cloud-setup`): make cloud-run ARGS='-S lora.r=16', make cloud-sweep ARGS='-S lora.r=8,16,32' (a job
per value), or .venv-cloud/bin/python cloud/launch.py --dry-run -S lora.r=16 (check and print the jobs, launch nothing).
Needs CLOUD_BUCKET=gs://bucket[/prefix], HEAD pushed to `origin` and the credentials the params need (docs/cloud.md)."""

import argparse
import itertools
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

REPO = Path(__file__).resolve().parents[1]
# The params schema itself: a job whose -S values the stages would refuse is refused here, before a GPU is paid for.
sys.path.insert(0, str(REPO))
from medgemma_breakhis.core.errors import ParamsError
from medgemma_breakhis.core.logs import without_user_info
from medgemma_breakhis.core.params import Params, add_override_argument, parse_params

logger = logging.getLogger(__name__)

TASK_YAML = Path(__file__).resolve().parent / "task.yaml"
KAGGLE_SECRETS = ("KAGGLE_USERNAME", "KAGGLE_KEY")
MLFLOW_SECRETS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
# gs://bucket[/prefix]: a Cloud Storage bucket name, and a prefix of plain path characters (mounted and substituted).
BUCKET_URL = re.compile(r"gs://(?P<bucket>[a-z0-9][a-z0-9._-]{1,220}[a-z0-9])(?P<prefix>/[A-Za-z0-9._/-]*)?")


class LaunchError(RuntimeError):
    """A precondition of launching is not met; the message says which and how to fix it."""


def split_values(value: str) -> list[str]:
    """`8,16,32` into its values, DVC's sweep syntax; commas inside brackets belong to a list value (`[40,100]`)."""
    values, depth = [""], 0
    for char in value:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            values.append("")
        else:
            values[-1] += char
    return values


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """The `-S key=value` overrides of every job: the grid over keys given several comma-separated values."""
    choices = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise LaunchError(f"-S {override}: expected key=value, e.g. -S lora.r=16")
        choices.append([f"{key}={v}" for v in split_values(value)])
    return [list(combination) for combination in itertools.product(*choices)]


def job_params(params_yaml: str, overrides: list[str]) -> Params:
    """The job's params (params.yaml at the commit, then its -S overrides); `LaunchError` where a stage would refuse."""
    ours = [override.removeprefix("params.yaml:") for override in overrides]
    try:
        return parse_params(params_yaml, [o for o in ours if ":" not in o.partition("=")[0]])
    except ParamsError as err:
        raise LaunchError(f"{' '.join(overrides) or 'params.yaml'}: {err}") from None


def tracking_server(environ: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The tracking server's URL without credentials, for the job's plain variables, and its credentials; "" if none."""
    if not (uri := environ.get("MLFLOW_TRACKING_URI", "")):
        return "", {}
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        raise LaunchError(
            f"MLFLOW_TRACKING_URI={parts.scheme}:… is a store on this machine, which the job cannot reach: unset it "
            "(each job keeps its own store on the bucket) or set it to a tracking server's http(s) URL"
        )
    if parts.query:
        raise LaunchError(
            "MLFLOW_TRACKING_URI has a query string, which MLflow does not send: give a token as MLFLOW_TRACKING_TOKEN"
        )
    secrets = {name: environ[name] for name in MLFLOW_SECRETS if environ.get(name)}
    if parts.username is not None or parts.password is not None:
        secrets["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
        secrets["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password or "")
        parts = without_user_info(parts)
    return parts.geturl(), {name: value for name, value in secrets.items() if value}


def hf_token_secret(environ: dict[str, str]) -> str:
    """CLOUD_HF_TOKEN_SECRET, checked: the id or projects/<project>/secrets/<id> of the secret the job reads."""
    name = environ.get("CLOUD_HF_TOKEN_SECRET", "")
    if name and not re.fullmatch(r"(projects/[a-z][a-z0-9-]{4,28}[a-z0-9]/secrets/)?[A-Za-z0-9_-]{1,255}", name):
        raise LaunchError(
            f"CLOUD_HF_TOKEN_SECRET={name[:80]!r} is not a Secret Manager secret id (letters, digits, '-', '_') or "
            "projects/<project>/secrets/<id>"
        )
    return name


def secrets_for(params_yaml: str, overrides: list[str], environ: dict[str, str]) -> dict[str, str]:
    """Exactly the credentials the job needs, from `environ`; `LaunchError` naming the first one missing."""
    params = job_params(params_yaml, overrides)
    needed = {}  # each credential the params need, and how to set it
    if params.model.kind == "hub" and not hf_token_secret(environ):
        needed["HF_TOKEN"] = (
            "accept MedGemma's terms on huggingface.co and `export HF_TOKEN=…`, or keep it in Secret Manager "
            "and `export CLOUD_HF_TOKEN_SECRET=<secret name>` (docs/cloud.md)"
        )
    if params.data.source == "kaggle":
        needed |= dict.fromkeys(KAGGLE_SECRETS, "`export KAGGLE_USERNAME=… KAGGLE_KEY=…` (Kaggle → Settings → API)")
    for name, fix in needed.items():
        if not environ.get(name):
            shown = " ".join(overrides) or "params.yaml"
            raise LaunchError(f"{name} is not set, and the experiment needs it ({shown}): {fix}")
    return {name: environ[name] for name in needed} | tracking_server(environ)[1]


def task_config(envs: dict[str, str], secrets: dict[str, str], gpus: str | None = None, on_demand: bool = False) -> Any:
    """cloud/task.yaml with one job's variables and secrets filled in, validated by SkyPilot's own loader."""
    import sky  # the optional install: only what launches or validates needs it

    config = yaml.safe_load(TASK_YAML.read_text())
    # A declared secret left without a value would make SkyPilot look for a secrets provider: drop the unneeded ones.
    config["secrets"] = {name: None for name in config.get("secrets") or {} if name in secrets}
    task = sky.Task.from_yaml_config(config, env_overrides=list(envs.items()), secrets_overrides=list(secrets.items()))
    overrides = ({"accelerators": gpus} if gpus else {}) | ({"use_spot": False} if on_demand else {})
    if overrides:
        task.set_resources_override(overrides)
    return task


def git(*args: str) -> str:
    result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else ""


def repository_url() -> str:
    """origin's URL without a user name or token; a token in it becomes GIT_TOKEN, which SkyPilot clones with."""
    if not (url := git("remote", "get-url", "origin")):
        raise LaunchError(
            "this repository has no `origin` remote: the job clones the commit from it and pushes the "
            "experiment back; `git remote add origin <url>`"
        )
    parts = urlsplit(url)
    if parts.scheme in ("http", "https") and (parts.username is not None or parts.password is not None):
        if parts.password:
            os.environ.setdefault("GIT_TOKEN", unquote(parts.password))
        url = without_user_info(parts).geturl()
    return url


def pushed_commit() -> str:
    """HEAD, once it is committed and on origin (as of the last fetch): the job runs that commit, not this tree."""
    if git("status", "--porcelain", "--untracked-files=no"):
        raise LaunchError("uncommitted changes: the job runs a commit; commit them and push, or stash them")
    head = git("rev-parse", "HEAD")
    if not git("for-each-ref", "--contains", head, "--format=%(refname)", "refs/remotes/origin/"):
        raise LaunchError(
            f"HEAD {head[:12]} is not on origin, the remote the job clones (as of the last fetch): `git push origin` it"
        )
    return head


def experiments_on_origin() -> set[str]:
    """The names of the DVC experiments origin has (refs/exps/<baseline>/<name>)."""
    listing = ["git", "ls-remote", "--refs", "origin", "refs/exps/*"]
    result = subprocess.run(listing, cwd=REPO, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LaunchError(f"cannot list origin's experiments (git ls-remote origin): {result.stderr.strip()[:300]}")
    return {line.rsplit("/", 1)[-1] for line in result.stdout.splitlines() if line.strip()}


def bucket_url(environ: dict[str, str]) -> str:
    """CLOUD_BUCKET, checked: gs://<bucket>[/<prefix>] with a valid bucket name."""
    bucket = environ.get("CLOUD_BUCKET", "")
    match = BUCKET_URL.fullmatch(bucket)
    name = match["bucket"] if match else ""
    if not match or any(len(part) > 63 or not part for part in name.split(".")) or name.startswith("goog"):
        raise LaunchError(
            f"CLOUD_BUCKET={bucket!r} is not gs://<bucket>[/<prefix>] with a Cloud Storage bucket name (3-63 "
            "lowercase letters, digits, '-', '_' or '.'): create one (docs/cloud.md) and "
            "`export CLOUD_BUCKET=gs://<bucket>/medgemma-breakhis`"
        )
    return bucket


def experiment_names(count: int, prefix: str | None) -> list[str]:
    """Unique names, valid as DVC experiment names and as SkyPilot job names."""
    prefix = prefix or time.strftime("cloud-%Y%m%d-%H%M%S")
    if not re.fullmatch(r"[a-z][a-z0-9-]*", prefix):
        raise LaunchError(f"--name {prefix}: use lowercase letters, digits and '-', starting with a letter")
    return [prefix] if count == 1 else [f"{prefix}-{index}" for index in range(1, count + 1)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_override_argument(parser)
    parser.add_argument("--sweep", action="store_true", help="one job per -S value (key=a,b), per combination of them")
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
        environ = dict(os.environ)
        bucket = bucket_url(environ)
        url, commit = repository_url(), pushed_commit()
        params_yaml = git("show", f"{commit}:params.yaml")
        tracking_uri, _ = tracking_server(environ)
        names = experiment_names(len(jobs), args.name)
        if taken := sorted(set(names) & experiments_on_origin()):
            raise LaunchError(
                f"experiment {', '.join(taken)} already exists on origin: choose another --name, or get it with "
                f"`dvc exp pull origin {taken[0]}`"
            )
        tasks = []
        for name, overrides in zip(names, jobs):
            secrets = secrets_for(params_yaml, overrides, environ)  # validates the params first
            needs_token = job_params(params_yaml, overrides).model.kind == "hub"
            envs = {
                "REPO_URL": url,
                "REPO_COMMIT": commit,
                "EXP_NAME": name,
                "BUCKET": bucket,
                "EXP_ARGS": shlex.join(arg for override in overrides for arg in ("-S", override)),
                "DVC_REMOTE": environ.get("CLOUD_DVC_REMOTE", ""),
                "MLFLOW_TRACKING_URI": tracking_uri,
                "HF_TOKEN_SECRET": hf_token_secret(environ) if needs_token else "",  # "" where HF_TOKEN is sent
            }
            tasks.append((name, task_config(envs, secrets, args.gpus, args.on_demand), secrets))
    except LaunchError as err:
        sys.exit(f"cloud launch: {err}")

    import sky

    for name, task, secrets in tasks:
        shown = task.envs["EXP_ARGS"] or "(params.yaml)"
        resources = ", ".join(map(str, task.resources))
        logger.info("%s: %s on %s, secrets %s", name, shown, resources, ", ".join(secrets) or "none")
        if not args.dry_run:
            sky.stream_and_get(sky.jobs.launch(task, name=name))
    if not args.dry_run:
        logger.info("follow: sky jobs queue; sky jobs logs <id>. Results: dvc exp pull origin <name>; dvc exp show")


if __name__ == "__main__":
    main()
