"""The `baseline` and `evaluate` stages: score the test set with the base model, or base + adapter."""

from __future__ import annotations

import functools
import gc
import logging
import time
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from matplotlib.figure import Figure
from peft import PeftModel
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

from medgemma_breakhis.atomic import atomic_write_json, atomic_write_text
from medgemma_breakhis.errors import DataError
from medgemma_breakhis.labels import CLASS_NAMES
from medgemma_breakhis.metrics import UNPARSEABLE, evaluation_metrics, headline, roc_points
from medgemma_breakhis.modeling import NonFiniteError, check_model, load_base_model, non_finite_advice
from medgemma_breakhis.params import Params
from medgemma_breakhis.registry import register_adapter
from medgemma_breakhis.scoring import predict_split
from medgemma_breakhis.splits import read_split
from medgemma_breakhis.tracking import (
    dvc_locked_md5,
    loaded_model_tags,
    origin_tags,
    pipeline_children,
    stage_run,
    untracked_record,
)

logger = logging.getLogger(__name__)


def confusion_matrix_figure(truth: pd.Series, predicted: pd.Series, names: list[str], title: str) -> Figure:
    """Counts of true (rows) against predicted (columns) classes, every class shown even when absent."""
    figure = Figure(figsize=(2 + 0.9 * len(names), 1.5 + 0.9 * len(names)), layout="constrained")
    axes = figure.subplots()
    ConfusionMatrixDisplay.from_predictions(
        truth, predicted, labels=names, ax=axes, colorbar=False, xticks_rotation="vertical"
    )
    axes.set_title(title)
    return figure


def confusion_matrix_figures(predictions: pd.DataFrame, stage: str) -> dict[str, Figure]:
    """The 8-class and the binary confusion matrices, by their image names in MLflow."""
    # An unparseable answer gets its own column rather than vanishing from the matrix.
    extra = ["unparseable"] if (predictions["predicted"] == UNPARSEABLE).any() else []
    return {
        "confusion_matrix_eight_class.png": confusion_matrix_figure(
            predictions["true_class"], predictions["predicted_class"], [*CLASS_NAMES, *extra], f"{stage}: 8 classes"
        ),
        "confusion_matrix_binary.png": confusion_matrix_figure(
            predictions["true_binary"],
            predictions["predicted_binary"],
            ["benign", "malignant", *extra],
            f"{stage}: benign / malignant",
        ),
    }


def roc_figure(roc: pd.DataFrame, auc: float, stage: str) -> Figure:
    """The ROC curve (malignant positive) of `roc_points`, as `dvc plots` draws it, for MLflow."""
    figure = Figure(figsize=(5, 5), layout="constrained")
    axes = figure.subplots()
    RocCurveDisplay(fpr=roc["false_positive_rate"], tpr=roc["true_positive_rate"], roc_auc=auc, name=stage).plot(
        ax=axes, plot_chance_level=True
    )
    axes.set_title(f"{stage}: ROC, malignant positive")
    return figure


def tag_adapter_origin(adapter_dir: Path, md5: str | None, parent_run_id: str) -> None:
    """Point this run, and the `train` run of the same pipeline execution that wrote the adapter, at the adapter's
    DVC hash."""
    if md5 is None:
        mlflow.set_tag("adapter_dvc_md5", "not in a dvc.lock (stage run outside DVC)")
        return
    mlflow.set_tag("adapter_dvc_md5", md5)
    for train_run in pipeline_children(parent_run_id, "train", {"adapter_path": str(adapter_dir)})[:1]:
        if train_run.info.status == "FINISHED":
            mlflow.MlflowClient().set_tag(train_run.info.run_id, "adapter_dvc_md5", md5)


def run_evaluation(
    params: Params,
    stage: str,
    *,
    image_root: Path,
    test_csv: Path,
    metrics_path: Path,
    predictions_path: Path,
    roc_path: Path,
    adapter_dir: Path | None = None,
    register: bool = False,
) -> dict[str, Any]:
    """Predict the test split, and write the metrics JSON, the per-image predictions and the ROC curve points.

    With `adapter_dir`, the adapter is applied unmerged: merging LoRA into bf16 weights shifts logits enough to flip
    predictions (docs/design.md#the-adapter-is-applied-unmerged). With `register` too, the adapter is registered
    as a new version of the MLflow model `registry.model_name`, the metrics linked to it (`registry`).
    """
    rows = read_split(test_csv, image_root)
    if adapter_dir is not None and not (adapter_dir / "adapter_config.json").is_file():
        raise DataError(f"no adapter in {adapter_dir}; run `dvc repro train` first")
    check_model(params.model)
    with stage_run(stage, params, test_csv, untracked_record(metrics_path)) as tracked:
        started = time.perf_counter()
        model, processor, info = load_base_model(params.model, params.eval.precision)
        tracked.tags(
            "the loaded model's tags",
            loaded_model_tags(info, precision_ran=f"{info.dtype} weights, inference without autocast"),
        )
        adapter_md5 = None if adapter_dir is None else dvc_locked_md5(adapter_dir)
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, adapter_dir)
            parent = tracked.run.data.tags["mlflow.parentRunId"]
            tracked.track(
                "the adapter's DVC hash", functools.partial(tag_adapter_origin, adapter_dir, adapter_md5, parent)
            )
        loaded = time.perf_counter()
        try:
            predictions = predict_split(model, processor, rows, image_root, params.eval)
        except NonFiniteError as err:
            raise NonFiniteError(
                f"{stage}: {err}. {non_finite_advice(params.eval.precision, 'eval.precision')}"
            ) from err
        timing = {
            "time_model_load_s": loaded - started,
            "images_per_second": len(rows) / (time.perf_counter() - loaded),
        }
        metrics = evaluation_metrics(predictions, params.eval.bootstrap_resamples, params.eval.seed)
        tracked.refuse_if_params_changed()
        roc = roc_points(predictions)
        atomic_write_text(predictions_path, predictions.to_csv(index=False))
        atomic_write_text(roc_path, roc.to_csv(index=False))
        atomic_write_json(metrics_path, metrics)
        tracked.metrics("the stage's timing", timing)
        registering = register and adapter_dir is not None
        if not registering:  # a registration logs them with the model it registers
            tracked.metrics("the metrics", headline(metrics))
        for path in (metrics_path, predictions_path, roc_path):
            tracked.artifact(path, path.parent.name)
        for name, figure in confusion_matrix_figures(predictions, stage).items():
            tracked.figure(f"the confusion matrix {name}", figure, name)
        if "roc_auc" in metrics["binary"]:
            tracked.figure("the ROC curve", roc_figure(roc, metrics["binary"]["roc_auc"], stage), "roc_curve.png")
        # Last: a registration that fails costs none of the stage's other records.
        if registering:
            # Logging the model loads it again to check its input example: the scored copy is freed first.
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            tracked.track(
                f"the model version of {params.registry.model_name} and the metrics",
                functools.partial(
                    register_adapter,
                    adapter_dir=adapter_dir,
                    params=params,
                    base=info,
                    origin=origin_tags(),
                    adapter_md5=adapter_md5,
                    headline=headline(metrics),
                ),
            )
    logger.info("%s (%s): %s", stage, params.eval.method, headline(metrics))
    return metrics
