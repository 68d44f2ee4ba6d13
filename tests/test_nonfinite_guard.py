"""The fp16 overflow of the reference experiment (docs/reference-experiment.md#precision), reproduced on a tiny
model, is caught in training and in scoring, and `make compare-precision` reports it as fp16's divergence."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from dvc_cli import run
from repo_params import params as with_params
from repo_params import write_params

from medgemma_breakhis.evaluate.evaluation import run_evaluation
from medgemma_breakhis.evaluate.scoring import score_images
from medgemma_breakhis.model.load import NonFiniteError, load_base_model
from medgemma_breakhis.train.callbacks import TrainingDivergedError
from stages import train


def test_scoring_refuses_non_finite_logits_in_fp16_only(
    overflowing_model: Path, synthetic_root: Path, split_dir: Path
) -> None:
    images = [synthetic_root / f for f in pd.read_csv(split_dir / "test.csv")["filename"][:2]]
    model, processor, _ = load_base_model(with_params({"model": {"id": str(overflowing_model)}}).model, "bf16")
    assert torch.isfinite(torch.from_numpy(score_images(model, processor, images, batch_size=2))).all()
    model, processor, _ = load_base_model(with_params({"model": {"id": str(overflowing_model)}}).model, "fp16")
    with pytest.raises(NonFiniteError, match=f"non-finite logits with the model in torch.float16 for {images[0].name}"):
        score_images(model, processor, images, batch_size=2)


@pytest.mark.slow  # the whole baseline stage, with its MLflow store
def test_evaluation_in_fp16_fails_its_run_and_points_to_bf16(
    overflowing_model: Path, synthetic_root: Path, split_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    params = with_params({"model": {"id": str(overflowing_model)}, "eval": {"precision": "fp16"}})
    with pytest.raises(NonFiniteError, match=r"baseline: non-finite logits .* set eval.precision=bf16"):
        run_evaluation(
            params,
            "baseline",
            image_root=synthetic_root,
            test_csv=split_dir / "test.csv",
            metrics_path=tmp_path / "baseline.json",
            predictions_path=tmp_path / "predictions.csv",
            roc_path=tmp_path / "roc.csv",
        )
    assert not any((tmp_path / name).exists() for name in ("baseline.json", "predictions.csv", "roc.csv"))
    (run,) = mlflow.MlflowClient(store).search_runs(["1"], "tags.stage = 'baseline'")
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"].startswith("NonFiniteError: baseline: non-finite logits")


@pytest.mark.slow  # the whole train stage, with its MLflow store
def test_fp16_overflow_stops_training_at_once_fails_the_run_and_leaves_no_adapter(
    overflowing_model: Path,
    split_dir: Path,
    tmp_path: Path,
    stage_folder: Path,
    train_argv: Callable[[Path], list[str]],
) -> None:
    write_params(tmp_path, {"model": {"id": str(overflowing_model)}, "train": {"precision": "fp16", "epochs": 1}})
    with pytest.raises(TrainingDivergedError) as diverged:
        train.main(train_argv(split_dir / "train.csv"))
    message = str(diverged.value)
    assert message.startswith("training loss is nan at optimizer step 1 of ")
    assert "with train.precision=fp16 (float16 base weights, no autocast" in message
    assert "set train.precision=bf16" in message
    assert not (tmp_path / "models").exists()
    assert not (tmp_path / "metrics").exists()
    assert not (tmp_path / "plots").exists()
    assert not list((tmp_path / "checkpoints").glob("*/checkpoint-*"))  # nothing diverged is kept to resume from

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(["1"], "tags.stage = 'train'")
    assert run.info.status == "FAILED"
    assert run.data.tags["diverged_at_step"] == "1"
    assert run.data.tags["failure_reason"].startswith("TrainingDivergedError: training loss is nan at optimizer step 1")
    assert run.data.tags["precision_ran"].startswith("float16 base weights, no autocast")
    (logged_loss,) = client.get_metric_history(run.info.run_id, "loss")
    assert (logged_loss.step, str(logged_loss.value)) == (1, "nan")
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FAILED"
    assert parent.data.tags["failure_reason"].startswith("train: TrainingDivergedError")


@pytest.mark.e2e  # tools/precision_comparison.py: two DVC experiments, in a copy of the reproduced repository
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
