"""The whole offline pipeline through the real `dvc` CLI, in a temporary git repository.

One repository is reproduced once for the module. Tests that only read it share it; a test that changes it (an
experiment, a kill, a sweep, a remote) works on its own copy, so the tests hold in any order and alone. No command
may print a secret, and no repository, the shared one or a copy, may keep one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import pytest
import torch
from dvc_cli import SECRET_VALUES, SECRETS, copy_of, run, run_json, stages_run
from dvc_task.proc.process import ProcessInfo
from mlflow.entities import Run
from ruamel.yaml import YAML

from medgemma_breakhis.params import load_params, to_flat_dict

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]


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


def open_cross_validation(repo: Path) -> None:
    """What `make cv` does before running it: take cv/dvc.yaml into the DVC project (.dvcignore keeps it out)."""
    ignore = repo / ".dvcignore"
    ignore.write_text(
        "".join(line for line in ignore.read_text().splitlines(keepends=True) if line.strip() != "/cv/dvc.yaml")
    )


def mlflow_client(repo: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def search(repo: Path, filter_string: str) -> list[Run]:
    client = mlflow_client(repo)
    experiment = client.get_experiment_by_name("medgemma-breakhis")
    return client.search_runs([experiment.experiment_id], filter_string, order_by=["attributes.start_time ASC"])


def pipeline_group(repo: Path, dvc_exp_name: str) -> tuple[Run, dict[str, Run]]:
    """The parent run of one pipeline execution and its stage runs by stage."""
    (parent,) = search(repo, f"tags.run_kind = 'pipeline' and tags.dvc_exp_name = '{dvc_exp_name}'")
    children = search(repo, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return parent, {child.data.tags["stage"]: child for child in children}


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


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


@pytest.fixture
def workspace(repo: Path, tmp_path: Path) -> Iterator[Path]:
    """A copy of the reproduced repository for one test; afterwards, checked for kept secrets."""
    copy = copy_of(repo, tmp_path / "workspace")
    yield copy
    assert_no_secret_kept(copy)


@pytest.fixture(scope="module")
def generate_experiment(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A copy of the repository after `dvc exp run --temp` of `eval.method=generate`, and that command's output."""
    copy = copy_of(repo, tmp_path_factory.mktemp("generate") / "workspace")
    output = run(
        copy,
        "dvc",
        "exp",
        "run",
        "--temp",
        "--name",
        "eval-generate",
        "-S",
        "eval.method=generate",
        "-S",
        "eval.max_new_tokens=4",
    )
    return copy, output


def test_full_repro_fine_tunes_well_beyond_the_baseline(repo: Path) -> None:
    baseline = read_json(repo / "metrics" / "baseline.json")
    finetuned = read_json(repo / "metrics" / "finetuned.json")
    assert set(finetuned) == {"eight_class", "binary", "patient_level", "n_images", "n_unparseable"}
    assert set(finetuned["eight_class"]) == {
        "accuracy",
        "accuracy_ci95_low",
        "accuracy_ci95_high",
        "f1_weighted",
        "per_class",
        "expected_calibration_error",
    }
    assert set(finetuned["binary"]) == {
        "accuracy",
        "accuracy_ci95_low",
        "accuracy_ci95_high",
        "f1_malignant",
        "roc_auc",
    }
    assert set(finetuned["patient_level"]) == {"accuracy", "eight_class_accuracy", "n_patients"}
    assert finetuned["n_images"] == baseline["n_images"] > 0
    assert finetuned["n_unparseable"] == 0
    for metrics in (baseline, finetuned):
        for kind in ("eight_class", "binary"):
            figures = metrics[kind]
            assert figures["accuracy_ci95_low"] <= figures["accuracy"] <= figures["accuracy_ci95_high"]
    assert finetuned["eight_class"]["accuracy"] >= baseline["eight_class"]["accuracy"] + 0.4
    assert finetuned["eight_class"]["accuracy"] >= 0.7
    assert finetuned["binary"]["roc_auc"] > baseline["binary"]["roc_auc"]
    for name in ("baseline", "finetuned"):
        predictions = pd.read_csv(repo / "predictions" / f"{name}.csv")
        assert len(predictions) == finetuned["n_images"]
        assert (predictions["predicted_class"] == predictions["true_class"]).mean() == pytest.approx(
            read_json(repo / "metrics" / f"{name}.json")["eight_class"]["accuracy"]
        )
    assert (repo / "models" / "adapter" / "adapter_config.json").is_file()
    assert (repo / "mlflow.db").is_file()


def test_plots_render_confusion_matrices_roc_and_loss(repo: Path) -> None:
    plots = run_json(repo, "dvc", "plots", "show", "--json")["data"]
    expected = {
        f"confusion_{kind}_{stage}" for kind in ("eight_class", "binary") for stage in ("baseline", "finetuned")
    }
    assert expected | {"roc_malignant", "training_loss"} <= set(plots)
    for plot_id in expected | {"roc_malignant", "training_loss"}:
        assert plots[plot_id][0]["content"]["data"]["values"], plot_id
    steps = read_json(repo / "metrics" / "train.json")["global_steps"]
    assert len(plots["training_loss"][0]["content"]["data"]["values"]) == steps


def test_one_repro_is_one_mlflow_parent_run_with_a_child_per_stage(repo: Path) -> None:
    parent, children = pipeline_group(repo, "workspace")
    assert set(children) == {"baseline", "train", "evaluate"}
    assert parent.info.status == "FINISHED"
    assert all(child.info.status == "FINISHED" for child in children.values())
    assert {child.data.tags["pipeline_key"] for child in children.values()} == {parent.data.tags["pipeline_key"]}


def test_stage_runs_carry_params_metrics_artifacts_and_origin(repo: Path) -> None:
    _, children = pipeline_group(repo, "workspace")
    expected_params = {key: str(value) for key, value in to_flat_dict(load_params(repo / "params.yaml")).items()}
    split = {
        "train": repo / "data" / "split" / "train.csv",
        "baseline": repo / "data" / "split" / "test.csv",
        "evaluate": repo / "data" / "split" / "test.csv",
    }
    client = mlflow_client(repo)
    reproduced_commit = run(repo, "git", "rev-parse", "HEAD~1").strip()  # the fixture committed the results after
    for stage, run_ in children.items():
        tags = run_.data.tags
        assert expected_params.items() <= run_.data.params.items(), stage
        assert tags["git_commit"] == reproduced_commit
        assert tags["git_dirty"] == "false"
        assert tags["dvc_exp_name"] == "workspace"
        assert tags["data_split_sha256"] == sha256(split[stage])
        assert (tags["model_id"], tags["model_revision"]) == ("tiny-gemma3", "main")
        assert tags["model_resolved_revision"].startswith("sha256:")
        assert tags["device"] == "cpu"
        assert tags["version.torch"] == torch.__version__
        assert {"version.transformers", "version.peft", "version.trl", "version.dvc", "version.python"} <= set(tags)
        assert run_.data.metrics["peak_process_rss_gib"] > 0
    adapter_md5 = locked_md5(repo, "train", "models/adapter")

    train = children["train"]
    assert train.data.tags["precision_ran"] == "bfloat16 base weights + bf16 autocast"
    assert train.data.tags["adapter_dvc_md5"] == adapter_md5
    steps = json.loads((repo / "metrics" / "train.json").read_text())["global_steps"]
    for key in ("loss", "learning_rate", "grad_norm"):
        assert [m.step for m in client.get_metric_history(train.info.run_id, key)] == list(range(1, steps + 1)), key
    assert {a.path for a in client.list_artifacts(train.info.run_id)} == {
        "metrics",
        "plots",
        "adapter",
        "loss_curve.png",
    }
    assert [a.path for a in client.list_artifacts(train.info.run_id, "adapter")] == ["adapter/adapter_config.json"]

    for stage, metrics_file in (("baseline", "baseline.json"), ("evaluate", "finetuned.json")):
        run_ = children[stage]
        metrics = json.loads((repo / "metrics" / metrics_file).read_text())
        assert run_.data.metrics["eight_class_accuracy"] == metrics["eight_class"]["accuracy"]
        assert run_.data.metrics["binary_f1_malignant"] == metrics["binary"]["f1_malignant"]
        assert run_.data.tags["precision_ran"] == "bfloat16 weights, inference without autocast"
        assert {a.path for a in client.list_artifacts(run_.info.run_id)} == {
            "metrics",
            "predictions",
            "plots",
            "confusion_matrix_eight_class.png",
            "confusion_matrix_binary.png",
            "roc_curve.png",
        }
        assert [a.path for a in client.list_artifacts(run_.info.run_id, "metrics")] == [f"metrics/{metrics_file}"]
        assert run_.data.metrics["eight_class_accuracy_ci95_low"] == metrics["eight_class"]["accuracy_ci95_low"]
    assert children["evaluate"].data.tags["adapter_dvc_md5"] == adapter_md5
    assert (repo / "mlartifacts").is_dir()
    # the adapter as a version of the registered model, traced to the DVC hash and commit it came from
    (version,) = client.search_model_versions("name = 'medgemma-breakhis'")
    assert version.run_id == children["evaluate"].info.run_id
    assert {"adapter_dvc_md5": adapter_md5, "git_commit": reproduced_commit, "dvc_exp_name": "workspace"}.items() <= (
        version.tags.items()
    )


def test_second_repro_runs_nothing(repo: Path) -> None:
    output = run(repo, "dvc", "repro")
    assert stages_run(output) == []
    assert "Data and pipelines are up to date" in output


def test_a_prompt_edit_reruns_the_model_stages_and_not_the_data_stages(workspace: Path) -> None:
    """The prompt lives beside the conversation it goes into (prompt.py), which only the model stages import."""
    prompt = workspace / "medgemma_breakhis" / "prompt.py"
    prompt.write_text(prompt.read_text().replace("Analyze this breast tissue", "Analyse this breast tissue", 1))
    changed = run_json(workspace, "dvc", "status", "--json")
    assert sorted(changed) == ["baseline", "evaluate", "train"]
    assert all({"changed deps": {"medgemma_breakhis/prompt.py": "modified"}} in changed[name] for name in changed)


def test_store_failing_right_after_training_fails_neither_the_stage_nor_the_next_repro(
    workspace: Path, lock_store
) -> None:
    repo = workspace
    metrics, record = repo / "metrics" / "train.json", repo / "metrics" / "train.untracked.json"
    before = metrics.stat().st_mtime_ns

    def trained() -> bool:  # DVC deletes the outputs first; the stage writes train.json once training is over
        return metrics.exists() and metrics.stat().st_mtime_ns != before

    with lock_store(repo / "mlflow.db", when=trained) as taken:  # from the end of training until dvc is done
        output = run(repo, "dvc", "repro", "--force", "--single-item", "train")
    assert taken.is_set()
    assert stages_run(output) == ["train"]
    # (MLflow's own logger also prints the SQLAlchemy traceback of each refused query: its log, left as it is)
    assert "could not track" in output and "database is locked" in output
    assert (repo / "models" / "adapter" / "adapter_config.json").is_file()
    assert not list((repo / "checkpoints").glob("*/checkpoint-*"))
    not_tracked = read_json(record)
    *_, parent = search(repo, "tags.run_kind = 'pipeline' and tags.dvc_exp_name = 'workspace'")
    (train,) = search(repo, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert train.info.run_id == not_tracked["run_id"]
    assert train.info.status == "RUNNING" and "tracking_incomplete" not in train.data.tags  # not complete-looking

    output = run(repo, "dvc", "repro")  # DVC recorded the adapter: nothing to train again
    assert stages_run(output) == []
    # read; the record and its hash in dvc.lock back to the fixture's
    run(repo, "git", "checkout", "HEAD", "--", "metrics/train.untracked.json", "dvc.lock")
    assert run(repo, "git", "status", "--porcelain").strip() == ""


def test_what_a_temp_experiment_could_not_track_is_kept_in_its_commit(workspace: Path, lock_store) -> None:
    """852abeb: DVC warned that metrics/finetuned.untracked.json "will not be included in experiment commits", and
    a `--temp` (or queued, or cloud) experiment lost it with its copy of the workspace."""
    repo = workspace
    assert read_json(repo / "metrics" / "finetuned.untracked.json") == {"not_tracked": []}  # the committed run's

    def evaluated() -> bool:  # the experiment's evaluate has written its metrics, in DVC's temporary copy
        for path in repo.glob(".dvc/tmp/exps/standalone/*/metrics/finetuned.json"):
            try:  # generate's metrics have no calibration: not the committed file, nor one half-written
                if "expected_calibration_error" not in json.loads(path.read_text())["eight_class"]:
                    return True
            except (OSError, ValueError, KeyError):
                continue
        return False

    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        **SECRETS,
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    log = repo.parent / "locked-store.log"
    command = ["dvc", "exp", "run", "--temp", "--name", "locked-store", "-S", "eval.method=generate", "evaluate"]
    # from the end of evaluate until its first write has failed (each locked write waits out sqlite's 20 s)
    with lock_store(repo / "mlflow.db", when=evaluated) as taken, log.open("w") as stream:
        experiment = subprocess.Popen(command, cwd=repo, env=env, stdout=stream, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 900
        while "could not track" not in log.read_text() and experiment.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
    assert experiment.wait(timeout=900) == 0, log.read_text()[-4000:]
    output = log.read_text()
    assert not any(secret in output.encode() for secret in SECRET_VALUES)
    assert taken.is_set() and stages_run(output) == ["evaluate"]
    assert "will not be included in experiment commits" not in output
    refs = run(repo, "git", "for-each-ref", "refs/exps", "--format=%(refname)", stdout_only=True).split()
    (ref,) = [name for name in refs if name.endswith("/locked-store")]
    record = json.loads(run(repo, "git", "show", f"{ref}:metrics/finetuned.untracked.json", stdout_only=True))
    assert record["not_tracked"] and any("database is locked" in item for item in record["not_tracked"])
    assert read_json(repo / "metrics" / "finetuned.untracked.json") == {"not_tracked": []}  # the workspace's own


def test_generate_mode_rescores_without_retraining_and_temp_run_leaves_workspace(
    generate_experiment: tuple[Path, str],
) -> None:
    repo, output = generate_experiment
    assert stages_run(output) == ["baseline", "evaluate"]
    assert run(repo, "git", "status", "--porcelain").strip() == ""
    assert "eval-generate" in run(repo, "dvc", "exp", "show", "--no-pager", "--md")


def test_temp_experiment_runs_land_in_the_main_store_with_their_artifacts(
    generate_experiment: tuple[Path, str],
) -> None:
    repo, _ = generate_experiment
    assert_no_secret_kept(repo)
    parent, children = pipeline_group(repo, "eval-generate")
    assert set(children) == {"baseline", "evaluate"}
    assert parent.data.params["eval.method"] == "generate"
    n_images = read_json(repo / "metrics" / "baseline.json")["n_images"]
    for child in children.values():
        # a random tiny model seldom answers with a class number: counted, and never turned into a class
        unparseable = child.data.metrics["n_unparseable"]
        assert child.data.metrics["eight_class_accuracy"] <= 1 - unparseable / n_images
    for child in children.values():
        artifacts = Path(child.info.artifact_uri.removeprefix("file://"))
        assert artifacts.is_relative_to(repo / "mlartifacts")
        assert len(list((artifacts / "predictions").glob("*.csv"))) == 1
    assert list((repo / ".dvc").rglob("mlflow.db")) == []
    assert list((repo / ".dvc").rglob("mlruns")) == []


def test_lora_rank_experiment_retrains_and_metrics_diff_shows_it(workspace: Path) -> None:
    repo = workspace
    output = run(repo, "dvc", "exp", "run", "-S", "lora.r=16", "-S", "train.epochs=1")
    assert stages_run(output) == ["train", "evaluate"]
    diff = run_json(repo, "dvc", "metrics", "diff", "--json")
    assert "metrics/train.json" in diff
    assert diff["metrics/train.json"]["train_loss_mean"]["diff"] != 0
    params_diff = run_json(repo, "dvc", "params", "diff", "--json")
    assert (params_diff["params.yaml"]["lora.r"]["old"], params_diff["params.yaml"]["lora.r"]["new"]) == (8, 16)
    experiment_name = next(line.split()[-1] for line in output.splitlines() if line.startswith("Ran experiment(s):"))
    _, children = pipeline_group(repo, experiment_name)
    assert set(children) == {"train", "evaluate"}
    assert children["train"].data.params["lora.r"] == "16"


def test_killed_training_resumes_from_its_checkpoint_to_the_same_adapter(workspace: Path) -> None:
    """`dvc repro` killed outright during `train`; a run of other params refuses its checkpoint; the next
    `dvc repro` resumes from it and produces the adapter of the uninterrupted run, byte for byte."""
    repo = workspace
    uninterrupted = locked_md5(repo, "train", "models/adapter")
    metrics_before = (repo / "metrics" / "train.json").read_text()
    yaml = YAML()
    params = yaml.load(repo / "params.yaml")
    params["train"]["checkpoint_steps"] = 4  # not a training input: nothing re-runs for it
    yaml.dump(params, repo / "params.yaml")
    assert stages_run(run(repo, "dvc", "repro")) == []

    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        **SECRETS,
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    killed = subprocess.Popen(
        ["dvc", "repro", "--force", "--single-item", "train"],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    saved = repo / "checkpoints"
    deadline = time.monotonic() + 600
    while not list(saved.glob("train-*/checkpoint-12/trainer_state.json")) and time.monotonic() < deadline:
        assert killed.poll() is None, "dvc repro ended before it could be killed"
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)  # dvc and the stage: no handler runs, as on a power loss
    killed.wait()
    (folder,) = saved.glob("train-*")
    assert not (repo / "models" / "adapter").exists()

    other = run(repo, "dvc", "exp", "run", "--temp", "-S", "lora.r=4", "-S", "train.epochs=1", "train")
    assert (
        f"not resuming the checkpoints in {folder}: made under different inputs:\n"
        "    params lora.r: 8 in the checkpoint, 4 now\n    params train.epochs: 3 in the checkpoint, 1 now" in other
    )
    assert "resuming from" not in other
    assert (folder / "checkpoint-12").is_dir()

    resumed = run(repo, "dvc", "repro")
    # evaluate does not re-run: the adapter is the one dvc.lock already has
    assert stages_run(resumed) == ["train"]
    assert f"resuming from {folder / 'checkpoint-12'}: optimizer steps 1-12 are done" in resumed
    assert locked_md5(repo, "train", "models/adapter") == uninterrupted
    assert (repo / "metrics" / "train.json").read_text() == metrics_before
    assert not folder.exists()

    *_, latest = search(repo, "tags.run_kind = 'pipeline' and tags.dvc_exp_name = 'workspace'")
    (train,) = search(repo, f"tags.mlflow.parentRunId = '{latest.info.run_id}'")  # the resumed `dvc repro`
    assert train.data.tags["resumed_from_step"] == "12"
    steps = json.loads(metrics_before)["global_steps"]
    assert [m.step for m in mlflow_client(repo).get_metric_history(train.info.run_id, "loss")] == list(
        range(13, steps + 1)
    )


def set_params(repo: Path, **values: object) -> None:
    """Edit params.yaml in place, e.g. set_params(repo, train__epochs=1)."""
    yaml = YAML()
    params = yaml.load(repo / "params.yaml")
    for key, value in values.items():
        section, name = key.split("__")
        params[section][name] = value
    yaml.dump(params, repo / "params.yaml")


def stop_queue_workers(repo: Path, env: dict[str, str]) -> None:
    """Stops the queue's workers and waits for them to exit.

    An idle worker stays up for a minute, pinging itself through files in the queue's broker folder; the secrets
    scan that follows the test would race those files (one vanished between listing and reading, in CI).
    """
    celery = repo / ".dvc" / "tmp" / "exps" / "celery"
    pids = [ProcessInfo.load(str(path)).pid for path in celery.glob("dvc-exp-worker-*.json")]
    assert pids, "no queue worker was recorded"
    subprocess.run(["dvc", "queue", "stop"], cwd=repo, env=env, capture_output=True, check=True, timeout=60)
    processes = []
    for pid in pids:
        try:
            processes.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(processes, timeout=120)
    assert not alive, f"queue workers still running after dvc queue stop: {alive}"


def test_queued_sweep_runs_one_experiment_per_value_on_two_workers(workspace: Path) -> None:
    repo = workspace
    queued = run(repo, "dvc", "exp", "run", "--queue", "-S", "lora.r=4,16", "-S", "train.epochs=1")
    names = re.findall(r"Queued experiment '([^']+)'", queued)
    assert len(names) == 2
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        **SECRETS,
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    # the workers are daemons that outlive `queue start` (and would hold a captured stdout open): poll the queue
    subprocess.run(
        ["dvc", "queue", "start", "-j", "2"],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
        timeout=60,
    )
    deadline = time.monotonic() + 900
    while True:
        status = run(repo, "dvc", "queue", "status")  # rows: task, name, created, status
        rows = {
            parts[1]: parts[-1] for parts in map(str.split, status.splitlines()) if len(parts) > 2 and parts[1] in names
        }
        done = len(rows) == len(names) and set(rows.values()) <= {"Success", "Failed"}
        if done or time.monotonic() > deadline:
            break
        time.sleep(2)
    for name in names:
        run(repo, "dvc", "queue", "logs", name)  # kept for the secrets scan below
    stop_queue_workers(repo, env)
    assert rows == dict.fromkeys(names, "Success"), status

    shown = run_json(repo, "dvc", "exp", "show", "--json")
    experiments = {
        rev["name"]: rev["data"]
        for commit in shown
        for exp in commit.get("experiments") or []
        for rev in exp["revs"]
        if rev.get("name") in names
    }
    ranks = {name: data["params"]["params.yaml"]["data"]["lora"]["r"] for name, data in experiments.items()}
    assert sorted(ranks.values()) == [4, 16]
    for name, data in experiments.items():
        metrics = data["metrics"]
        assert metrics["metrics/train.json"]["data"]["global_steps"] == 16  # one epoch
        assert 0 <= metrics["metrics/finetuned.json"]["data"]["eight_class"]["accuracy"] <= 1
        _, children = pipeline_group(repo, name)  # each queued run lands in the main store, grouped
        assert set(children) == {"train", "evaluate"}
        assert children["train"].data.params["lora.r"] == str(ranks[name])
    table = run(repo, "dvc", "exp", "show", "--no-pager", "--md", "--keep", "lora.r")
    assert all(name in table for name in names)
    assert list((repo / "checkpoints").glob("train-*")) == []  # each finished run removed its own


def test_cross_validation_runs_every_fold_and_writes_mean_and_spread(workspace: Path, tmp_path: Path) -> None:
    repo = workspace
    folds = [1, 2]  # a matrix of two folds runs the same machinery as one of five
    set_params(repo, train__epochs=1, cv__folds=folds)
    open_cross_validation(repo)
    output = run(repo, "dvc", "repro", "cv/dvc.yaml")
    for stage in ("split", "baseline", "train", "evaluate"):
        assert all(f"Running stage 'cv/dvc.yaml:{stage}@{fold}-100'" in output for fold in folds), stage
    assert "Running stage 'cv/dvc.yaml:summary'" in output
    assert "Running stage 'train'" not in output and "Running stage 'download'" not in output

    per_fold = [read_json(repo / "cv" / "metrics" / f"fold{fold}-100x" / "finetuned.json") for fold in folds]
    accuracies = [metrics["eight_class"]["accuracy"] for metrics in per_fold]
    summary = read_json(repo / "cv" / "summary.json")["100x"]
    assert summary["n_folds"] == len(folds)
    assert summary["finetuned"]["eight_class"]["accuracy"] == pytest.approx(
        {
            "mean": statistics.mean(accuracies),
            "std": statistics.stdev(accuracies),
            "min": min(accuracies),
            "max": max(accuracies),
        }
    )
    test_sets = [
        set(pd.read_csv(repo / "cv" / "folds" / f"fold{fold}-100x" / "split" / "test.csv")["patient"]) for fold in folds
    ]
    assert all(not a & b for i, a in enumerate(test_sets) for b in test_sets[i + 1 :])  # each patient tested once
    table = (repo / "cv" / "summary.md").read_text().splitlines()
    assert [row.split("|")[1].strip() for row in table[3:]] == ["1", "2", "mean ± std", "[min, max]"]
    (workspace,) = run_json(repo, "dvc", "metrics", "show", "--json").values()
    assert "cv/summary.json" in workspace["data"]

    *_, parent = search(repo, "tags.run_kind = 'pipeline' and tags.dvc_exp_name = 'workspace'")
    trains = search(repo, f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.stage = 'train'")
    assert sorted(int(train.data.params["split.fold"]) for train in trains) == folds
    lock = YAML(typ="safe").load(repo / "cv" / "dvc.lock")["stages"]
    for train in trains:
        fold = train.data.params["split.fold"]
        assert train.info.run_name == f"train (fold {fold}, 100X)"
        (adapter,) = [o for o in lock[f"train@{fold}-100"]["outs"] if o["path"].endswith("adapter")]
        assert train.data.tags["adapter_dvc_md5"] == adapter["md5"]
    assert "Running stage" not in run(repo, "dvc", "repro", "cv/dvc.yaml")

    run(repo, "git", "add", "-A")
    run(repo, "git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "cross-validation")
    # once it has run, cv/dvc.yaml's outputs are pulled like the rest
    clone = clean_in_a_fresh_clone(repo, tmp_path, base="HEAD~1")
    assert (clone / "cv" / "folds" / "fold2-100x" / "adapter" / "adapter_config.json").is_file()


def test_push_and_pull_round_trip_through_a_remote_without_checkpoints(workspace: Path, tmp_path: Path) -> None:
    """A local folder stands in for the gs:// bucket: the same `dvc push`/`dvc pull`, another storage backend."""
    repo = workspace
    assert "gs (gcsfs" in run(repo, "dvc", "version")  # dvc-gs is installed for the GCS remote of docs/scaling.md
    remote = tmp_path / "remote"
    run(repo, "dvc", "remote", "add", "--local", "-d", "shared", str(remote))  # --local: .dvc/config.local, not git
    checkpoint = repo / "checkpoints" / "train-0123456789abcdef" / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    marker = f"checkpoint {uuid.uuid4()}".encode()
    (checkpoint / "adapter_model.safetensors").write_bytes(marker)
    run(repo, "dvc", "push")
    assert all(marker not in path.read_bytes() for path in remote.rglob("*") if path.is_file())

    # the cross-validation has never run in this history (the commit above was reset away): it is not in the way
    clone = clean_in_a_fresh_clone(repo, tmp_path)
    for out in ("data/raw", "data/split", "models/adapter"):
        files = sorted(p.relative_to(repo) for p in (repo / out).rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(clone) for p in (clone / out).rglob("*") if p.is_file()), out
        assert all((repo / f).read_bytes() == (clone / f).read_bytes() for f in files), out
    for metrics in ("metrics/finetuned.json", "metrics/data.json", "predictions/finetuned.csv"):  # git carries these
        assert (clone / metrics).read_bytes() == (repo / metrics).read_bytes()
    assert "Data and pipelines are up to date" in run(clone, "dvc", "repro")
    assert not (clone / "checkpoints").exists()
    assert_no_secret_kept(clone)


def test_precision_comparison_reports_the_fp16_overflow_as_diverged(workspace: Path, overflowing_model: Path) -> None:
    repo = workspace
    output = run(
        repo,
        sys.executable,
        "-m",
        "tools.precision_comparison",
        "-S",
        f"model.id={overflowing_model}",
        "-S",
        "train.epochs=1",
        "-S",
        "data.synthetic.images_per_patient=2",
        "--out",
        "reports/precision.md",
    )
    table = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:4]]
        for line in (repo / "reports" / "precision.md").read_text().splitlines()
        if line.startswith("| ")
    }
    assert table[""] == ["bf16", "fp16"]
    assert table["training"] == ["finished", "diverged at step 1 (non-finite loss)"]
    assert table["precision that ran"] == [
        "bfloat16 base weights + bf16 autocast",
        "float16 base weights, no autocast (fp16 mixed precision needs a GPU)",
    ]
    assert table["non-finite loss steps"] == ["0", "1"]
    assert table["peak CUDA memory allocated (GiB)"] == ["n/a (ran on CPU)"] * 2
    assert float(table["test 8-class accuracy"][0]) >= 0
    assert table["test 8-class accuracy"][1] == "not evaluated"
    assert re.search(r"\| training +\| finished +\| diverged at step 1", output), output
    assert "No GPU here" in output


def test_no_secret_reaches_mlflow_logs_or_dvc_files(repo: Path) -> None:
    """The reproduction ran with fake HF/Kaggle credentials in its environment; every other test's copy is checked
    the same way when it ends, and every command's output as it runs."""
    assert_no_secret_kept(repo)
    assert (repo / "mlflow.db").is_file() and any((repo / "mlartifacts").rglob("*.csv"))
    for run_ in search(repo, ""):
        # so the file scan covered its artifacts
        assert Path(run_.info.artifact_uri.removeprefix("file://")).is_relative_to(repo / "mlartifacts")
