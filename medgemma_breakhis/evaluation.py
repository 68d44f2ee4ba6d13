"""The `baseline` and `evaluate` stages: score the test set with the base model, or base + adapter."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from matplotlib.figure import Figure
from peft import PeftModel
from sklearn.metrics import ConfusionMatrixDisplay

from medgemma_breakhis.atomic import atomic_write_json
from medgemma_breakhis.data import read_split
from medgemma_breakhis.labels import CLASS_NAMES, NUM_CLASSES
from medgemma_breakhis.modeling import NonFiniteError, load_base_model, non_finite_advice
from medgemma_breakhis.params import Params
from medgemma_breakhis.scoring import evaluate_split
from medgemma_breakhis.tracking import dvc_locked_md5, log_loaded_model, pipeline_children, stage_run

logger = logging.getLogger(__name__)


def confusion_matrix_figure(labels: np.ndarray, predicted: np.ndarray, names: list[str], title: str) -> Figure:
    """Counts of true (rows) against predicted (columns) classes, every class shown even when absent."""
    figure = Figure(figsize=(2 + 0.9 * len(names), 1.5 + 0.9 * len(names)), layout="constrained")
    axes = figure.subplots()
    ConfusionMatrixDisplay.from_predictions(labels, predicted, labels=list(range(len(names))), display_labels=names,
                                            ax=axes, colorbar=False, xticks_rotation="vertical")
    axes.set_title(title)
    return figure


def log_confusion_matrices(labels: np.ndarray, predicted: np.ndarray, stage: str) -> None:
    mlflow.log_figure(confusion_matrix_figure(labels, predicted, list(CLASS_NAMES), f"{stage}: 8 classes"),
                      "confusion_matrix_eight_class.png")
    malignant = NUM_CLASSES // 2
    mlflow.log_figure(confusion_matrix_figure((labels >= malignant).astype(int), (predicted >= malignant).astype(int),
                                              ["benign", "malignant"], f"{stage}: benign / malignant"),
                      "confusion_matrix_binary.png")


def tag_adapter_origin(adapter_dir: Path, parent_run_id: str) -> None:
    """Point this run, and the `train` run of the same pipeline execution, at the adapter's DVC hash."""
    md5 = dvc_locked_md5("train", adapter_dir)
    if md5 is None:
        mlflow.set_tag("adapter_dvc_md5", "not in dvc.lock (stage run outside DVC)")
        return
    mlflow.set_tag("adapter_dvc_md5", md5)
    for train_run in pipeline_children(parent_run_id, "train")[:1]:
        if train_run.info.status == "FINISHED":
            mlflow.MlflowClient().set_tag(train_run.info.run_id, "adapter_dvc_md5", md5)


def run_evaluation(params: Params, stage: str, image_root: Path, test_csv: Path, metrics_path: Path,
                   adapter_dir: Path | None = None) -> dict[str, Any]:
    """Score the test split and write the metrics JSON; with `adapter_dir`, the adapter is applied unmerged.

    Unmerged, because merging LoRA into bf16 weights shifts logits enough to flip predictions (REFERENCE.md §4).
    """
    rows = read_split(test_csv, image_root)
    if adapter_dir is not None and not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no adapter in {adapter_dir}; run `dvc repro train` first")
    with stage_run(stage, params, test_csv) as run:
        model, processor, info = load_base_model(params.model, params.eval.precision)
        log_loaded_model(info, precision_ran=f"{info.dtype} weights, inference without autocast")
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, adapter_dir)
            tag_adapter_origin(adapter_dir, run.data.tags["mlflow.parentRunId"])
        try:
            metrics, predictions = evaluate_split(model, processor, rows, image_root, params.eval.batch_size)
        except NonFiniteError as err:
            raise NonFiniteError(f"{stage}: {err}. {non_finite_advice(params.eval.precision, 'eval.precision')}") \
                from err
        atomic_write_json(metrics_path, metrics)
        mlflow.log_metrics({
            "eight_class_accuracy": metrics["eight_class"]["accuracy"],
            "eight_class_f1_weighted": metrics["eight_class"]["f1_weighted"],
            "binary_accuracy": metrics["binary"]["accuracy"],
            "binary_f1_malignant": metrics["binary"]["f1_malignant"],
        })
        mlflow.log_artifact(str(metrics_path))
        mlflow.log_text(predictions.to_csv(index=False), "predictions.csv")
        log_confusion_matrices(predictions["label"].to_numpy(), predictions["predicted"].to_numpy(), stage)
    logger.info("%s metrics: %s", stage, metrics)
    return metrics
