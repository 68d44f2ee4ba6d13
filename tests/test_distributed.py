"""`train` with execution.num_processes=2: two DDP processes (gloo, on the CPU) under `accelerate launch`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from repo_params import params, write_params

from medgemma_breakhis.data.breakhis import FOLDS_CSV
from medgemma_breakhis.data.split import write_split
from medgemma_breakhis.train.execution import ProcessCountError, run_distributed_if_asked


@pytest.mark.slow  # two training processes under accelerate launch
def test_two_processes_train_one_adapter_tracked_once(
    synthetic_root: Path, tmp_path: Path, train_argv: Callable[[str], list[str]], stage_env: dict[str, str]
) -> None:
    write_params(tmp_path, {"model": {"id": "tiny-gemma3"}, "train": {"epochs": 1}, "execution": {"num_processes": 2}})
    write_split(synthetic_root / FOLDS_CSV, params().split, tmp_path / "split", tmp_path / "split" / "summary.json")
    result = subprocess.run(
        [sys.executable, "-m", "stages.train", *train_argv("split/train.csv")],
        cwd=tmp_path,
        env=stage_env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training on 2 process(es), 8 examples per optimizer step; each process: micro-batch 4 x 1" in result.stderr
    assert result.stderr.count("loaded tiny-gemma3") == 2  # one model per process
    images = len(pd.read_csv(tmp_path / "split" / "train.csv"))
    summary = json.loads((tmp_path / "metrics" / "train.json").read_text())
    # each step: 4 images on each of 2 processes; each process gets half the images, the sampler padding an odd count
    assert summary["global_steps"] == math.ceil(math.ceil(images / 2) / 4)
    assert len(pd.read_csv(tmp_path / "plots" / "train_loss.csv")) == summary["global_steps"]
    assert (tmp_path / "models" / "adapter" / "adapter_model.safetensors").is_file()

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (train,) = client.search_runs(["1"], "tags.stage = 'train'")  # rank 1 tracks nothing
    assert train.info.status == "FINISHED"
    assert (train.data.tags["num_processes"], train.data.tags["distributed_backend"]) == ("2", "gloo")
    assert train.data.params["execution.num_processes"] == "2"


def test_a_launch_on_other_processes_than_the_params_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(
        ProcessCountError,
        match="launched on 4 processes but execution.num_processes=2; set -S execution.num_processes=4",
    ):
        run_distributed_if_asked(2, "stages.train", [])
    run_distributed_if_asked(4, "stages.train", [])  # agrees: carries on in this process
