"""Two experiments in one workspace: a second `dvc exp run` writes its -S values into params.yaml before it fails on
DVC's lock, under the first one's running stages. A stage that notices refuses to record anything. And experiments
run side by side as DVC means them to: a queued sweep on two workers."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import mlflow
import psutil
import pytest
from dvc_cli import command_env, experiments_shown, pipeline_group, run
from dvc_task.proc.process import ProcessInfo
from repo_params import raw_params, write_params

from medgemma_breakhis.core.errors import ParamsChangedError
from medgemma_breakhis.core.params import load_params
from medgemma_breakhis.core.stage import dvc_set_params
from medgemma_breakhis.track.runs import changed_since, params_digest, tracked_run
from medgemma_breakhis.track.store import experiment_id
from stages import baseline


def write(folder: Path, resamples: int) -> None:
    write_params(folder, {"model": {"id": "tiny-gemma3"}, "eval": {"bootstrap_resamples": resamples}})


def baseline_argv(synthetic_root: Path, split: Path, metrics: str) -> list[str]:
    return [
        *("--images", str(synthetic_root), "--test", str(split / "test.csv")),
        *("--metrics", metrics, "--predictions", "predictions.csv", "--roc", "roc.csv"),
    ]


@pytest.mark.slow  # the baseline stage, twice
def test_a_stage_refuses_to_record_after_params_yaml_changed_under_its_pipeline_execution(
    stage_folder: Path, synthetic_root: Path, split_dir: Path
) -> None:
    write(stage_folder, 100)
    baseline.main(baseline_argv(synthetic_root, split_dir, "first.json"))  # the execution's first stage
    # what a second `dvc exp run -S eval.bootstrap_resamples=200` in the same workspace writes, then fails on the lock
    write(stage_folder, 200)
    with pytest.raises(
        ParamsChangedError,
        match=r"^params.yaml changed while this stage ran \(since this pipeline execution's first stage began\): "
        r"another `dvc exp run` in this workspace",
    ):
        baseline.main(baseline_argv(synthetic_root, split_dir, "second.json"))  # a later stage of the same execution
    assert (stage_folder / "first.json").is_file() and not (stage_folder / "second.json").exists()
    runs = mlflow.MlflowClient().search_runs([experiment_id()], "tags.stage = 'baseline'")
    assert [run.data.params["eval.bootstrap_resamples"] for run in runs] == ["100"]  # nothing recorded under 200


def test_params_yaml_changed_while_a_stage_ran_is_refused_before_its_results_are_written(
    stage_folder: Path, split_dir: Path
) -> None:
    write(stage_folder, 100)
    with (
        pytest.raises(ParamsChangedError, match=r"^params.yaml changed while this stage ran \(since this stage began"),
        tracked_run("baseline", load_params(), split_dir / "test.csv", stage_folder / "untracked.json") as tracked,
    ):
        write(stage_folder, 200)
        tracked.refuse_if_params_changed()
    (run,) = mlflow.MlflowClient().search_runs([experiment_id()], "tags.stage = 'baseline'")
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"].startswith("ParamsChangedError: ")


def test_the_values_dvc_exp_run_was_asked_for_are_checked_against_params_yaml(tmp_path: Path) -> None:
    command = [
        *("/venv/bin/python", "/venv/bin/dvc", "exp", "run", "-S", "eval.bootstrap_resamples=100"),
        *("--set-param=params.yaml:lora.r=16", "-S", "other.yaml:x=1", "-S", "lora.alpha=8,16", "-S", "cv.folds=[1,2]"),
    ]
    asked = dvc_set_params(command)
    assert asked == {"eval.bootstrap_resamples": 100, "lora.r": 16, "cv.folds": [1, 2]}  # not a sweep, nor another file
    assert dvc_set_params(["dvc", "repro", "-S", "lora.r=1"]) == {}
    params = write_params(tmp_path, {"eval": {"bootstrap_resamples": 200}, "lora": {"r": 16}, "cv": {"folds": [1, 2]}})
    assert changed_since(params_digest(params), asked, params) == (
        f"{params} has eval.bootstrap_resamples=200, but dvc exp run was asked for eval.bootstrap_resamples=100"
    )
    params.write_text(
        json.dumps(raw_params({"eval": {"bootstrap_resamples": 100}, "lora": {"r": 16}, "cv": {"folds": [1, 2]}}))
    )
    assert changed_since(params_digest(params), asked, params) is None


def test_a_comment_or_an_execution_setting_added_to_params_yaml_is_no_change(tmp_path: Path) -> None:
    """852abeb compared the file's bytes: a comment appended while `train` ran refused 48 finished steps."""
    params = write_params(tmp_path)
    digest = params_digest(params)
    params.write_text(params.read_text().replace("micro_batch_size: auto", "micro_batch_size: 2") + "# a note\n")
    assert changed_since(digest, {}, params) is None
    params.write_text(params.read_text().replace("r: 8", "r: 16"))
    assert changed_since(digest, {}, params) == f"{params} changed while this stage ran"


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


@pytest.mark.e2e  # the real dvc CLI: its queue and two workers, in a copy of the reproduced repository
def test_queued_sweep_runs_one_experiment_per_value_on_two_workers(workspace: Path) -> None:
    repo = workspace
    queued = run(repo, "dvc", "exp", "run", "--queue", "-S", "lora.r=4,16", "-S", "train.epochs=1")
    names = re.findall(r"Queued experiment '([^']+)'", queued)
    assert len(names) == 2
    env = command_env() | {"OMP_NUM_THREADS": "1"}
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
    # make compare after a sweep: each experiment against HEAD; then two experiment names, A and B
    compared = run(repo, "python", "-m", "tools.compare", stdout_only=True)
    assert all(f"{name} against HEAD (A)" in compared for name in names), compared
    paired = run(repo, "python", "-m", "tools.compare", *names, stdout_only=True)
    assert "| patient-level accuracy |" in paired and "verdict" in paired, paired

    experiments = {name: data for name, data in experiments_shown(repo).items() if name in names}
    ranks = {name: data["params"]["params.yaml"]["data"]["lora"]["r"] for name, data in experiments.items()}
    assert sorted(ranks.values()) == [4, 16]
    for name, data in experiments.items():
        training = json.loads(run(repo, "git", "show", f"{data['rev']}:metrics/train.json", stdout_only=True))
        assert training["global_steps"] == 16  # one epoch
        headline = data["metrics"]["metrics/headline/finetuned.json"]["data"]["finetuned"]
        assert 0 <= headline["eight_class_accuracy"] <= 1
        _, children = pipeline_group(repo, name)  # each queued run lands in the main store, grouped
        assert set(children) == {"train", "evaluate"}
        assert children["train"].data.params["lora.r"] == str(ranks[name])
    table = run(repo, "dvc", "exp", "show", "--no-pager", "--md", "--keep", "lora.r")
    assert all(name in table for name in names)
    kept = [len(list(folder.glob("checkpoint-*"))) for folder in (repo / "checkpoints").glob("train-*")]
    assert set(kept) <= {1}  # each finished run keeps its last checkpoint only, until its adapter is in the DVC cache
