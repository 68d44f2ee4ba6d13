"""Cloud GPU jobs (cloud/): the SkyPilot task validates with SkyPilot's own loader, the launcher fails fast on a
missing credential, and the job's run script runs experiments end to end on this machine, against local stand-ins
for the cloud: a bare git repository as origin, a folder as the DVC remote and a folder as the bucket mount.

The SkyPilot tests need the optional install (`make cloud-setup`, which CI runs); without it they are skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from dvc_cli import SECRETS, copy_of, experiments_shown, run
from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]
CLOUD_PYTHON = REPO / ".venv-cloud" / "bin" / "python"
needs_engine = pytest.mark.skipif(
    not CLOUD_PYTHON.exists(), reason="the cloud engine is not installed: make cloud-setup"
)


def yaml_load(text: str) -> dict:
    return YAML(typ="safe").load(text)


def load_launcher():
    spec = importlib.util.spec_from_file_location("cloud_launch", REPO / "cloud" / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_sweep_is_one_job_per_combination_of_values() -> None:
    launch = load_launcher()
    assert launch.expand_sweep(["lora.r=8,16", "split.fold=1,2"]) == [
        ["lora.r=8", "split.fold=1"],
        ["lora.r=8", "split.fold=2"],
        ["lora.r=16", "split.fold=1"],
        ["lora.r=16", "split.fold=2"],
    ]
    # a list value is one value, as in DVC's own sweep syntax
    assert launch.expand_sweep(["cv.magnifications=[40,100],[200]"]) == [
        ["cv.magnifications=[40,100]"],
        ["cv.magnifications=[200]"],
    ]
    assert launch.experiment_names(2, "lr-sweep") == ["lr-sweep-1", "lr-sweep-2"]


def test_the_launcher_asks_only_for_the_credentials_the_params_need_and_names_a_missing_one() -> None:
    launch = load_launcher()
    params = (REPO / "params.yaml").read_text()
    with pytest.raises(launch.LaunchError, match=r"^HF_TOKEN is not set, .*export HF_TOKEN=…`, or keep it in Secret"):
        launch.secrets_for(params, ["lora.r=16"], {"KAGGLE_USERNAME": "u", "KAGGLE_KEY": "k"})
    with pytest.raises(launch.LaunchError, match="^KAGGLE_USERNAME is not set"):
        launch.secrets_for(params, [], {"HF_TOKEN": "t"})
    assert launch.secrets_for(params, ["data.source=synthetic", "model.id=tiny-gemma3"], {}) == {}
    local = ["data.source=local", "data.path=/data/breakhis"]
    assert launch.secrets_for(params, local, {"HF_TOKEN": "t", "PATH": "/bin"}) == {"HF_TOKEN": "t"}


EVERY_CREDENTIAL = {
    "HF_TOKEN": "hf_x",
    "KAGGLE_USERNAME": "u",
    "KAGGLE_KEY": "k",
    "MLFLOW_TRACKING_PASSWORD": "p",
    "GIT_TOKEN": "g",
}


def test_the_launcher_sends_exactly_the_credentials_the_params_need_and_none_inside_urls() -> None:
    """852abeb: tiny-gemma3 on synthetic data sent HF_TOKEN, KAGGLE_USERNAME, KAGGLE_KEY, MLFLOW_TRACKING_PASSWORD
    and GIT_TOKEN; a password in MLFLOW_TRACKING_URI went to the task's plain envs."""
    launch = load_launcher()
    params = (REPO / "params.yaml").read_text()
    offline = ["data.source=synthetic", "model.id=tiny-gemma3"]
    assert launch.secrets_for(params, offline, EVERY_CREDENTIAL) == {}
    for model in ("medgemma-4b-random", "./models/medgemma", "models/medgemma/v1", "/data/medgemma", "~/medgemma"):
        assert launch.secrets_for(params, ["data.source=synthetic", f"model.id={model}"], EVERY_CREDENTIAL) == {}
    assert set(launch.secrets_for(params, [], EVERY_CREDENTIAL)) == {"HF_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY"}
    # HF_TOKEN kept in Secret Manager: the job reads it on its machine, the launcher sends none
    from_manager = EVERY_CREDENTIAL | {"CLOUD_HF_TOKEN_SECRET": "hf-token"}
    assert "HF_TOKEN" not in launch.secrets_for(params, ["data.source=synthetic"], from_manager)
    with pytest.raises(launch.LaunchError, match="CLOUD_HF_TOKEN_SECRET='hf token;x' is not a Secret Manager"):
        launch.secrets_for(params, [], {"CLOUD_HF_TOKEN_SECRET": "hf token;x"})

    server = {"MLFLOW_TRACKING_URI": "https://carol:p%40ss@mlflow.example.org:8443/team"}
    assert launch.tracking_server(server) == (
        "https://mlflow.example.org:8443/team",
        {"MLFLOW_TRACKING_USERNAME": "carol", "MLFLOW_TRACKING_PASSWORD": "p@ss"},
    )
    assert launch.secrets_for(params, offline, server)["MLFLOW_TRACKING_PASSWORD"] == "p@ss"
    ipv6 = {"MLFLOW_TRACKING_URI": "http://carol:p%40ss@[fd00::1]:5000"}
    assert launch.tracking_server(ipv6)[0] == "http://[fd00::1]:5000"
    with pytest.raises(launch.LaunchError, match="a store on this machine, which the job cannot reach"):
        launch.tracking_server({"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"})
    with pytest.raises(launch.LaunchError, match="query string"):
        launch.tracking_server({"MLFLOW_TRACKING_URI": "https://mlflow.example.org/?token=abc"})


def test_the_launcher_refuses_params_and_buckets_the_job_would_refuse() -> None:
    """852abeb: `lora.r=-5` and unknown keys passed, and any gs:// string was a bucket, until a GPU was paid for."""
    launch = load_launcher()
    params = (REPO / "params.yaml").read_text()
    with pytest.raises(launch.LaunchError, match=r"^lora.r=-5: params: lora.r=-5 is not allowed; expected an integer"):
        launch.secrets_for(params, ["lora.r=-5"], EVERY_CREDENTIAL)
    with pytest.raises(launch.LaunchError, match=r"unknown key lora.rank"):
        launch.secrets_for(params, ["lora.rank=8"], EVERY_CREDENTIAL)
    assert launch.job_params(params, ["params.yaml:lora.r=16"]).lora.r == 16
    for bucket in ("gs://", "gs://ab", "gs://My_Bucket/x", "gs://bucket name", "gs://goog-bucket", "s3://bucket"):
        with pytest.raises(launch.LaunchError, match=r"^CLOUD_BUCKET=.* is not gs://<bucket>\[/<prefix>\]"):
            launch.bucket_url({"CLOUD_BUCKET": bucket})
    assert launch.bucket_url({"CLOUD_BUCKET": "gs://my-bucket.example/jobs/medgemma"})


def git_repository(path: Path, *files: str) -> Path:
    """A git repository at `path` with `files` of this repository committed."""
    path.mkdir()
    for name in files:
        (path / name).write_text((REPO / name).read_text())
    for command in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "init"]):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@e", *command], cwd=path, check=True)
    return path


def test_the_launcher_wants_head_on_origin_and_an_experiment_name_origin_does_not_have(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """852abeb: HEAD pushed to another remote passed the `pushed` check; a name already on origin launched a job that
    did nothing and exited 0."""
    launch = load_launcher()
    local = git_repository(tmp_path / "local", "params.yaml")
    for remote in ("origin", "fork"):
        subprocess.run(["git", "init", "-q", "--bare", str(tmp_path / remote)], check=True)
        subprocess.run(["git", "remote", "add", remote, str(tmp_path / remote)], cwd=local, check=True)
    subprocess.run(["git", "push", "-q", "fork", "main"], cwd=local, check=True)
    monkeypatch.setattr(launch, "REPO", local)
    with pytest.raises(launch.LaunchError, match="is not on origin, the remote the job clones"):
        launch.pushed_commit()
    subprocess.run(["git", "push", "-q", "origin", "main", "HEAD:refs/exps/ab/cdef01/myexp"], cwd=local, check=True)
    assert (
        launch.pushed_commit()
        == subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=local, capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    assert launch.experiments_on_origin() == {"myexp"}
    monkeypatch.setenv("CLOUD_BUCKET", "gs://my-bucket/jobs")
    with pytest.raises(SystemExit, match="experiment myexp already exists on origin: choose another --name"):
        launch.main(["--dry-run", "--name", "myexp", "-S", "lora.r=32", "-S", "data.source=synthetic"])


def run_script(
    machine: Path, bucket: Path, path: str = os.environ["PATH"], **variables: str
) -> subprocess.CompletedProcess:
    env = {"PATH": path, "HOME": str(machine), "EXP_NAME": "myexp", "BUCKET_DIR": str(bucket), **variables}
    return subprocess.run(
        ["bash", str(REPO / "cloud" / "run_experiment.sh")],
        cwd=machine,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_a_job_refuses_an_experiment_name_taken_by_another_job_instead_of_doing_nothing(tmp_path: Path) -> None:
    """852abeb: `EXP_NAME=myexp EXP_ARGS='-S lora.r=32'` with myexp on origin: `nothing to do`, exit 0."""
    local = git_repository(tmp_path / "local", "params.yaml")
    subprocess.run(["git", "clone", "-q", "--bare", str(local), str(tmp_path / "origin")], check=True)
    subprocess.run(["git", "clone", "-q", str(tmp_path / "origin"), str(tmp_path / "machine")], check=True)
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    made_elsewhere = run_script(tmp_path / "machine", bucket, EXP_ARGS="-S lora.r=32")  # not on origin yet
    assert made_elsewhere.returncode != 0 and "nothing to do" not in made_elsewhere.stderr  # went on (no dvc here)
    other_args = run_script(tmp_path / "machine", bucket, EXP_ARGS="-S lora.r=16")
    assert other_args.returncode == 2
    assert "error: experiment myexp belongs to a job of another commit or other arguments" in other_args.stderr
    subprocess.run(
        ["git", "push", "-q", str(tmp_path / "origin"), "HEAD:refs/exps/ab/cdef01/myexp"], cwd=local, check=True
    )
    again = run_script(tmp_path / "machine", bucket, EXP_ARGS="-S lora.r=32")  # a recovered attempt of the same job
    assert (again.returncode, again.stderr.strip()) == (
        0,
        "[cloud job] experiment myexp is already on origin: nothing to do",
    )
    fresh = tmp_path / "fresh-bucket"
    fresh.mkdir()
    elsewhere = run_script(tmp_path / "machine", fresh, EXP_ARGS="-S lora.r=32")
    assert elsewhere.returncode == 2 and "already on origin, made by another job" in elsewhere.stderr


def test_a_job_reads_hf_token_from_secret_manager_on_its_machine_and_never_prints_it(tmp_path: Path) -> None:
    """gcloud stands in for the job machine's Google Cloud CLI, as a bare repository stands in for origin."""
    machine = git_repository(tmp_path / "machine", "params.yaml")
    bucket, tools = tmp_path / "bucket", tmp_path / "bin"
    bucket.mkdir()
    tools.mkdir()
    gcloud = tools / "gcloud"
    gcloud.write_text(
        '#!/bin/sh\necho "$@" > "$(dirname "$0")/called"\n[ -n "$DENY" ] && { echo "ERROR: (gcloud.secrets.versions.access) PERMISSION_DENIED: denied" >&2; exit 1; }\necho hf_SECRETVALUE123\n'
    )
    gcloud.chmod(0o755)
    path = f"{tools}:/usr/bin:/bin"  # no dvc: the script stops after the token, at the install
    denied = run_script(machine, bucket, path, HF_TOKEN_SECRET="hf-token", DENY="1", JOB_VENV=str(tmp_path))
    assert denied.returncode == 2
    assert (
        "error: cannot read HF_TOKEN from Secret Manager secret hf-token with this machine's service account: "
        "ERROR: (gcloud.secrets.versions.access) PERMISSION_DENIED" in denied.stderr
    )
    assert "roles/secretmanager.secretAccessor" in denied.stderr
    read = run_script(machine, bucket, path, HF_TOKEN_SECRET="hf-token", JOB_VENV=str(tmp_path))
    assert "[cloud job] HF_TOKEN read from Secret Manager secret hf-token" in read.stderr
    assert (tools / "called").read_text().split() == ["secrets", "versions", "access", "latest", "--secret=hf-token"]
    assert "SECRETVALUE" not in read.stdout + read.stderr


def test_the_run_script_names_a_missing_variable_and_stops(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(REPO / "cloud" / "run_experiment.sh")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "BUCKET_DIR": str(tmp_path)},
        check=False,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip() == "[cloud job] error: EXP_NAME is not set: set it to the DVC experiment's name "
        "(cloud/launch.py does)"
    )


VALIDATE = """
import json, sys
sys.path.insert(0, "cloud")
import launch, sky, yaml
envs, secrets, gpus, on_demand = json.loads(sys.argv[1])
try:
    sky.Task.from_yaml("cloud/task.yaml")
    unfilled = None
except ValueError as err:
    unfilled = str(err)
task = launch.task_config(envs, secrets, gpus, on_demand)
(resources,) = task.resources
print(json.dumps({
    "unfilled": unfilled, "envs": task.envs, "secrets": sorted(task.secrets), "run": task.run, "workdir": task.workdir,
    "mounts": {path: [s.source, s.mode.value] for path, s in task.storage_mounts.items()},
    "use_spot": resources.use_spot, "accelerators": resources.accelerators, "job_recovery": resources.job_recovery,
    "disk_size": resources.disk_size, "repr": repr(task) + str(task.secrets)}))
"""


@pytest.mark.slow  # SkyPilot's loader in the cloud engine's Python, a subprocess
@needs_engine
@pytest.mark.parametrize(("gpus", "on_demand"), [(None, False), ("H100:1", True)])
def test_the_task_file_validates_with_skypilot_s_own_loader(gpus: str | None, on_demand: bool) -> None:
    envs = {
        "REPO_URL": "https://github.com/example/medgemma-breakhis.git",
        "REPO_COMMIT": "0123abcd" * 5,
        "EXP_NAME": "cloud-20261125-120000",
        "EXP_ARGS": "-S lora.r=16",
        "BUCKET": "gs://example-bucket/medgemma",
    }
    secrets = {"HF_TOKEN": SECRETS["HF_TOKEN"], "KAGGLE_USERNAME": "user", "KAGGLE_KEY": SECRETS["KAGGLE_KEY"]}
    result = subprocess.run(
        [str(CLOUD_PYTHON), "-c", VALIDATE, json.dumps([envs, secrets, gpus, on_demand])],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    task = json.loads(result.stdout.splitlines()[-1])
    assert "Environment variable 'REPO_URL' is None" in task["unfilled"]  # nothing launches half-filled
    assert envs.items() <= task["envs"].items()
    assert task["envs"]["BUCKET_DIR"] == "/bucket"
    assert task["secrets"] == ["HF_TOKEN", "KAGGLE_KEY", "KAGGLE_USERNAME"]
    assert task["workdir"] == {"url": envs["REPO_URL"], "ref": envs["REPO_COMMIT"]}
    assert task["mounts"] == {"/bucket": ["gs://example-bucket/medgemma", "MOUNT"]}
    assert task["run"] == "bash cloud/run_experiment.sh"
    assert task["use_spot"] is not on_demand
    assert task["accelerators"] == ({"H100": 1} if gpus else {"L4": 1})
    assert task["job_recovery"] == {"strategy": "FAILOVER", "max_restarts_on_errors": 0}
    assert task["disk_size"] == 256
    assert not any(SECRETS[name] in result.stdout + result.stderr for name in ("HF_TOKEN", "KAGGLE_KEY"))


def job_env(**variables: str) -> dict[str, str]:
    """The job's environment: the task's variables and secrets; the ready virtual environment for the install."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "DVC_"))}
    return env | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "JOB_VENV": str(Path(sys.executable).parent.parent),
        **SECRETS,
        **variables,
    }


@pytest.mark.e2e
@needs_engine
def test_jobs_run_resume_from_the_bucket_after_sigterm_and_reach_a_separate_clone(repo: Path, tmp_path: Path) -> None:
    repo = copy_of(repo, tmp_path / "workspace")  # given a remote and an origin below: the shared one stays as it is
    origin, remote, bucket = tmp_path / "origin.git", tmp_path / "dvc-remote", tmp_path / "bucket"
    bucket.mkdir()
    run(tmp_path, "git", "clone", "-q", "--bare", str(repo), str(origin))
    run(repo, "git", "remote", "add", "origin", str(origin))
    run(repo, "git", "fetch", "-q", "origin")
    run(repo, "dvc", "remote", "add", "--local", "-d", "shared", str(remote))
    run(repo, "dvc", "push")  # the inputs a job pulls: data/raw, the split, the adapter of the committed run
    commit = run(repo, "git", "rev-parse", "HEAD").strip()

    # The launcher checks the commit is on origin and builds one validated task per value; --dry-run launches none.
    launched = run(
        repo,
        "env",
        "CLOUD_BUCKET=gs://example-bucket/medgemma",
        str(CLOUD_PYTHON),
        "cloud/launch.py",
        "--dry-run",
        "--sweep",
        "--name",
        "grid",
        "-S",
        "lora.r=4,16",
    )
    assert "grid-1: -S lora.r=4 on" in launched and "grid-2: -S lora.r=16 on" in launched

    logs: list[Path] = []

    def job(name: str, *args: str) -> subprocess.Popen:
        """One attempt of a job on a fresh machine: SkyPilot's clone of the commit, then the task's run command."""
        machine = tmp_path / f"machine-{len(logs)}"
        run(tmp_path, "git", "clone", "-q", str(origin), str(machine))
        run(machine, "git", "checkout", "-q", commit)
        logs.append(tmp_path / f"{machine.name}.log")
        env = job_env(
            EXP_NAME=name, EXP_ARGS=" ".join(args), BUCKET_DIR=str(bucket), REPO_COMMIT=commit, DVC_REMOTE=str(remote)
        )
        return subprocess.Popen(
            ["bash", "cloud/run_experiment.sh"],
            cwd=machine,
            env=env,
            stdout=logs[-1].open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    # A spot preemption: SIGTERM to every process of the machine during training.
    args = ("-S", "lora.r=16", "-S", "train.epochs=1", "-S", "execution.checkpoint_steps=1000")
    preempted = job("cloud-r16", *args)
    deadline = time.monotonic() + 600
    while (
        "(the first: warm-up" not in logs[-1].read_text() and preempted.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.2)  # until the first optimizer step is done (the stage logs it)
    os.killpg(preempted.pid, signal.SIGTERM)
    assert preempted.wait(timeout=300) != 0
    while time.monotonic() < deadline:  # the training process may outlive dvc and the script for a moment
        try:
            os.killpg(preempted.pid, 0)
            time.sleep(0.2)
        except ProcessLookupError:
            break
    output = logs[-1].read_text()
    assert "SIGTERM received: finishing this optimizer step, saving a checkpoint, then stopping" in output
    (checkpoint,) = (bucket / "checkpoints").glob("train-*/checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    assert (checkpoint / "trainer_state.json").is_file()
    assert "cloud-r16" not in run(repo, "git", "ls-remote", str(origin))

    resumed = job("cloud-r16", *args)
    assert resumed.wait(timeout=900) == 0, logs[-1].read_text()[-4000:]
    output = logs[-1].read_text()
    assert "Running stage 'train'" in output and "Running stage 'evaluate'" in output
    assert "restoring the MLflow store of an earlier attempt" in output
    assert f"resuming from {checkpoint}: optimizer steps 1-{step} are done" in output
    kept = [len(list(folder.glob("checkpoint-*"))) for folder in (bucket / "checkpoints").iterdir()]
    assert kept == [1]  # the finished run's last checkpoint only, until a DVC cache holds its adapter

    # Without a team server the runs of both attempts are in one MLflow store on the bucket.
    client = mlflow.MlflowClient(f"sqlite:///{bucket / 'mlflow' / 'cloud-r16' / 'mlflow.db'}")
    trains = client.search_runs(
        ["1"], "tags.stage = 'train' and tags.dvc_exp_name = 'cloud-r16'", order_by=["attributes.start_time ASC"]
    )
    assert [train.info.status for train in trains] == ["KILLED", "FINISHED"]
    assert trains[1].data.tags["resumed_from_step"] == str(step)
    assert trains[1].data.params["lora.r"] == "16"

    # A job recovered after it had pushed does nothing again.
    again = job("cloud-r16", *args)
    assert again.wait(timeout=300) == 0
    assert "experiment cloud-r16 is already on origin: nothing to do" in logs[-1].read_text()

    # The user's side: a separate clone gets the experiment, with its metrics and its adapter.
    user = tmp_path / "user"
    run(tmp_path, "git", "clone", "-q", str(origin), str(user))
    run(user, "dvc", "remote", "add", "--local", "-d", "shared", str(remote))
    run(user, "dvc", "exp", "pull", "origin", "cloud-r16")
    experiments = experiments_shown(user)
    assert set(experiments) == {"cloud-r16"}
    data = experiments["cloud-r16"]
    assert data["params"]["params.yaml"]["data"]["lora"]["r"] == 16
    train_rows = len(pd.read_csv(repo / "data" / "split" / "train.csv"))
    training = json.loads(run(user, "git", "show", f"{data['rev']}:metrics/train.json", stdout_only=True))
    assert training["global_steps"] == train_rows // 8  # one epoch
    headline = data["metrics"]["metrics/headline/finetuned.json"]["data"]["finetuned"]
    assert 0 <= headline["eight_class_accuracy"] <= 1
    # Its adapter came from the DVC remote into the clone's cache (`dvc exp apply` would also check out the
    # cross-validation's outputs, which were never made).
    refs = run(user, "git", "for-each-ref", "refs/exps", "--format=%(refname) %(objectname)", stdout_only=True)
    (ref,) = [line.split()[1] for line in refs.splitlines() if line.split()[0].endswith("/cloud-r16")]
    lock = yaml_load(run(user, "git", "show", f"{ref}:dvc.lock", stdout_only=True))
    (adapter,) = [out["md5"] for out in lock["stages"]["train"]["outs"] if out["path"] == "models/adapter"]
    assert (user / ".dvc" / "cache" / "files" / "md5" / adapter[:2] / adapter[2:]).is_file()

    secrets = [value.encode() for key, value in SECRETS.items() if key != "KAGGLE_USERNAME"]
    git_objects = subprocess.run(
        ["git", "cat-file", "--batch-all-objects", "--batch"], cwd=origin, capture_output=True, check=True
    ).stdout
    for content in [
        git_objects,
        *(log.read_bytes() for log in logs),
        *(path.read_bytes() for path in bucket.rglob("*") if path.is_file()),
    ]:
        assert not any(secret in content for secret in secrets)
