"""A stage stopped part-way leaves nothing a later stage could take for a result; `train` stopped by SIGTERM saves
a checkpoint and the next run resumes from it; `dvc repro` killed outright resumes from the last checkpoint saved."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import pytest
from dvc_cli import command_env, locked_md5, mlflow_client, run, search, stages_run
from repo_params import params, write_params
from ruamel.yaml import YAML

from medgemma_breakhis.core.files import atomic_directory, atomic_write_text
from medgemma_breakhis.data.breakhis import FOLDS_CSV
from medgemma_breakhis.data.split import write_split


def test_a_failed_write_leaves_the_previous_output_and_no_partial_files(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "weights").write_text("previous")
    abandoned = tmp_path / ".adapter.partial-killed"  # what a SIGKILL'd writer leaves
    abandoned.mkdir()
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "weights").write_text("half")
        raise RuntimeError("killed")
    assert (target / "weights").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    atomic_write_text(tmp_path / "metrics.json", "{}")
    assert (tmp_path / "metrics.json").stat().st_mode & 0o044 == 0o044  # readable like any file, not mkstemp's 0600


def _stage(cwd: Path, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "stages.train", *argv]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow  # a signal to a training process: a subprocess
def test_sigterm_saves_a_checkpoint_fails_the_run_killed_and_the_next_run_resumes(
    synthetic_root: Path, tmp_path: Path, train_argv: Callable[[str], list[str]], stage_env: dict[str, str]
) -> None:
    # Checkpoints only far apart: the one found afterwards can only come from the signal.
    write_params(
        tmp_path, {"model": {"id": "tiny-gemma3"}, "train": {"epochs": 1}, "execution": {"checkpoint_steps": 1000}}
    )
    write_split(synthetic_root / FOLDS_CSV, params().split, tmp_path / "split", tmp_path / "split" / "summary.json")
    steps = len(pd.read_csv(tmp_path / "split" / "train.csv")) // 8  # 8 examples per optimizer step, one epoch
    log = tmp_path / "first.log"
    stage = _stage(tmp_path, train_argv("split/train.csv"), stage_env, log)
    deadline = time.monotonic() + 300
    while "(the first: warm-up" not in log.read_text() and stage.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # until the first optimizer step is done (the stage logs it)
    stage.send_signal(signal.SIGTERM)
    assert stage.wait(timeout=300) != 0
    output = log.read_text()
    assert "SIGTERM received: finishing this optimizer step, saving a checkpoint, then stopping" in output
    (checkpoint,) = (tmp_path / "checkpoints").glob("train-*/checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    assert (
        f"TrainingInterrupted: SIGTERM: training stopped at optimizer step {step} of {steps} and saved {checkpoint}"
        in output
    )
    assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "models").exists() and not (tmp_path / "metrics").exists()

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (interrupted,) = client.search_runs(["1"], "tags.stage = 'train'")
    assert interrupted.info.status == "KILLED"
    assert interrupted.data.tags["failure_reason"].startswith("TrainingInterrupted: SIGTERM")
    assert client.get_run(interrupted.data.tags["mlflow.parentRunId"]).info.status == "KILLED"

    stage = _stage(tmp_path, train_argv("split/train.csv"), stage_env, tmp_path / "second.log")
    assert stage.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert f"resuming from {checkpoint}: optimizer steps 1-{step} are done" in (tmp_path / "second.log").read_text()
    assert (tmp_path / "models" / "adapter" / "adapter_model.safetensors").is_file()
    assert len(pd.read_csv(tmp_path / "plots" / "train_loss.csv")) == steps  # the curve of both runs
    # kept, at its last step, until the adapter is in a DVC cache (there is none here)
    assert [path.name for path in checkpoint.parent.glob("checkpoint-*")] == [f"checkpoint-{steps}"]
    resumed = client.search_runs(["1"], "tags.stage = 'train' and attributes.status = 'FINISHED'")[0]
    assert resumed.data.tags["resumed_from_step"] == str(step)
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "loss")] == list(range(step + 1, steps + 1))


def _stage_processes(parent: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(parent).children(recursive=True) if "stages.train" in " ".join(p.cmdline())]


def _signal_once_training(command: list[str], project: Path, env: dict[str, str], log: Path) -> str:
    """Start `command`, and once its stage has logged an optimizer step send SIGTERM to the process started: `dvc`
    alone, or a `timeout` running dvc, which passes it on to dvc's whole process group as when its time is up. Returns
    what was logged, once the stage has ended."""
    started = subprocess.Popen(command, cwd=project, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    stage: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while "(the first: warm-up" not in log.read_text() and started.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # until the first optimizer step is done (the stage logs it)
        stage = _stage_processes(started.pid)
        assert len(stage) == 1, log.read_text()[-3000:]
        started.send_signal(signal.SIGTERM)
        assert started.wait(timeout=60) != 0
        _, alive = psutil.wait_procs(stage, timeout=60)
        assert not alive, "the stage outlived its dvc"
    finally:
        for process in stage:  # 852abeb: the orphan would train on for hours
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        if started.poll() is None:
            started.kill()
    return log.read_text()


@pytest.mark.slow  # dvc runs a training stage twice
def test_a_stage_never_outlives_its_dvc_killed_or_timed_out(
    synthetic_root: Path, tmp_path: Path, train_argv: Callable[[str], list[str]], stage_env: dict[str, str]
) -> None:
    """`kill -TERM <dvc pid>` (dvc alone) and `timeout … dvc repro` (the whole process group): either way `train` saves
    a checkpoint and stops with dvc, which records nothing; the next run resumes from it."""
    project = tmp_path / "project"
    project.mkdir()
    write_split(synthetic_root / FOLDS_CSV, params().split, project / "split", project / "split" / "summary.json")
    write_params(
        project, {"model": {"id": "tiny-gemma3"}, "train": {"epochs": 100}, "execution": {"checkpoint_steps": 1000}}
    )
    command = " ".join(["python", "-m", "stages.train", *train_argv("split/train.csv")])
    (project / "dvc.yaml").write_text(
        f"stages:\n  train:\n    cmd: {command}\n    deps: [split/train.csv]\n    outs: [models/adapter]\n"
    )
    env = stage_env | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "SHELL": "/bin/bash",
    }
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=project, env=env, check=True)

    output = _signal_once_training(["dvc", "repro"], project, env, tmp_path / "killed.log")
    assert "is gone: stopping this stage as on SIGTERM" in output
    (first,) = (project / "checkpoints").glob("train-*/checkpoint-*")
    assert f"TrainingInterrupted: SIGHUP: training stopped at optimizer step {first.name.split('-')[1]}" in output

    output = _signal_once_training(["timeout", "600", "dvc", "repro"], project, env, tmp_path / "timed-out.log")
    assert f"resuming from {first}" in output
    assert "SIGTERM received: finishing this optimizer step, saving a checkpoint, then stopping" in output
    assert "received again" not in output  # dvc's end, with the same signal, is not a second one
    (second,) = (project / "checkpoints").glob("train-*/checkpoint-*")
    assert int(second.name.split("-")[1]) > int(first.name.split("-")[1])
    assert not (project / "dvc.lock").exists() and not (project / "models").exists()
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert [run.info.status for run in client.search_runs(["1"], "tags.stage = 'train'")] == ["KILLED", "KILLED"]


@pytest.mark.e2e  # the real dvc CLI killed outright, in a copy of the reproduced repository
def test_killed_training_resumes_from_its_checkpoint_to_the_same_adapter(workspace: Path) -> None:
    """`dvc repro` killed outright during `train`; a run of other params refuses its checkpoint; the next
    `dvc repro` resumes from it and produces the adapter of the uninterrupted run, byte for byte."""
    repo = workspace
    uninterrupted = locked_md5(repo, "train", "models/adapter")
    metrics_before = (repo / "metrics" / "train.json").read_text()
    yaml = YAML()
    params = yaml.load(repo / "params.yaml")
    params["execution"]["checkpoint_steps"] = 4  # not a training input: nothing re-runs for it
    yaml.dump(params, repo / "params.yaml")
    assert stages_run(run(repo, "dvc", "repro")) == []

    killed = subprocess.Popen(
        ["dvc", "repro", "--force", "--single-item", "train"],
        cwd=repo,
        env=command_env(),
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
    steps = json.loads(metrics_before)["global_steps"]
    # the --temp run's finished folder was removed as this run started: its adapter is in the DVC cache
    assert [p.relative_to(folder.parent) for p in saved.glob("*/checkpoint-*")] == [
        Path(folder.name, f"checkpoint-{steps}")
    ]

    *_, latest = search(repo, "tags.run_kind = 'pipeline' and tags.dvc_exp_name = 'workspace'")
    (train,) = search(repo, f"tags.mlflow.parentRunId = '{latest.info.run_id}'")  # the resumed `dvc repro`
    assert train.data.tags["resumed_from_step"] == "12"
    assert [m.step for m in mlflow_client(repo).get_metric_history(train.info.run_id, "loss")] == list(
        range(13, steps + 1)
    )


@pytest.mark.e2e  # the real dvc CLI, in a copy of the reproduced repository
def test_a_training_dvc_failed_to_cache_is_saved_again_from_its_last_checkpoint(workspace: Path) -> None:
    """feb5c85 deleted the checkpoints as `train` ended: when DVC then failed to write the adapter into a read-only or
    full cache (it printed the error, wrote dvc.lock and exited 0), the next `dvc repro` trained again from step 1."""
    repo = workspace
    adapter = locked_md5(repo, "train", "models/adapter")
    steps = json.loads((repo / "metrics" / "train.json").read_text())["global_steps"]
    (last,) = (repo / "checkpoints").glob("train-*/checkpoint-*")  # the reproduction's, kept
    assert last.name == f"checkpoint-{steps}"
    cache = repo / ".dvc" / "cache" / "files" / "md5"
    listing = cache / adapter[:2] / adapter[2:]
    objects = [listing] + [cache / entry["md5"][:2] / entry["md5"][2:] for entry in json.loads(listing.read_text())]
    for path in objects:  # what the failed cache write left: dvc.lock written, the adapter not in the cache
        path.unlink()

    output = run(repo, "dvc", "repro")
    assert stages_run(output)[0] == "train"
    assert f"resuming from {last}: optimizer steps 1-{steps} are done" in output  # not from step 1
    resaved = locked_md5(repo, "train", "models/adapter")
    assert (cache / resaved[:2] / resaved[2:]).is_file()  # in the cache this time
    assert "Data and pipelines are up to date" in run(repo, "dvc", "repro")
