"""The figures a stage logs to MLflow: what `dvc plots` draws from the same files, as images in the run."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay


def confusion_matrix_figure(truth: pd.Series, predicted: pd.Series, names: list[str], title: str) -> Figure:
    """Counts of true (rows) against predicted (columns) classes, every class shown even when absent."""
    figure = Figure(figsize=(2 + 0.9 * len(names), 1.5 + 0.9 * len(names)), layout="constrained")
    axes = figure.subplots()
    ConfusionMatrixDisplay.from_predictions(
        truth, predicted, labels=names, ax=axes, colorbar=False, xticks_rotation="vertical"
    )
    axes.set_title(title)
    return figure


def roc_figure(roc: pd.DataFrame, auc: float, stage: str) -> Figure:
    """The ROC curve (malignant positive) of `metrics.roc_points`."""
    figure = Figure(figsize=(5, 5), layout="constrained")
    axes = figure.subplots()
    RocCurveDisplay(fpr=roc["false_positive_rate"], tpr=roc["true_positive_rate"], roc_auc=auc, name=stage).plot(
        ax=axes, plot_chance_level=True
    )
    axes.set_title(f"{stage}: ROC, malignant positive")
    return figure


def loss_figure(curve: pd.DataFrame) -> Figure:
    """The training loss per optimizer step, from the loss curve `train` writes."""
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    axes.plot(curve["step"], curve["loss"], marker="." if len(curve) < 50 else None)
    axes.set(xlabel="optimizer step", ylabel="loss", title="Training loss per optimizer step")
    axes.grid(alpha=0.3)
    return figure
