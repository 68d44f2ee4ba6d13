"""`train` with train.num_processes=2: two DDP processes (gloo, on the CPU) under `accelerate launch`."""

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

from medgemma_breakhis.distributed import ProcessCountError, run_distributed_if_asked
from medgemma_breakhis.folds import FOLDS_CSV
from medgemma_breakhis.params import SplitParams
from medgemma_breakhis.splits import write_split


@pytest.mark.slow  # two training processes under accelerate launch
def test_two_processes_train_one_adapter_tracked_once(
    synthetic_root: Path, tmp_path: Path, train_argv: Callable[[str], list[str]], stage_env: dict[str, str]
) -> None:
    (tmp_path / "params.yaml").write_text("model:\n  id: tiny-gemma3\ntrain:\n  epochs: 1\n  num_processes: 2\n")
    write_split(synthetic_root / FOLDS_CSV, SplitParams(), tmp_path / "split", tmp_path / "split" / "summary.json")
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
    assert train.data.params["train.num_processes"] == "2"


def test_a_launch_on_other_processes_than_the_params_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(
        ProcessCountError, match="launched on 4 processes but train.num_processes=2; set -S train.num_processes=4"
    ):
        run_distributed_if_asked(2, "stages.train", [])
    run_distributed_if_asked(4, "stages.train", [])  # agrees: carries on in this process
