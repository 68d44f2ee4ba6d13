"""The `baseline` and `evaluate` stages: score the test split with the base model, or base + adapter, and write its
metrics, per-image predictions and ROC curve."""

import gc
import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from matplotlib.figure import Figure
from peft import PeftModel
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

from medgemma_breakhis.core.errors import DataError
from medgemma_breakhis.core.files import atomic_write_json, atomic_write_text
from medgemma_breakhis.core.params import Params
from medgemma_breakhis.data.breakhis import CLASS_NAMES
from medgemma_breakhis.data.split import read_split
from medgemma_breakhis.evaluate import metrics
from medgemma_breakhis.evaluate.scoring import predict_split
from medgemma_breakhis.model.load import NonFiniteError, check_model, load_base_model, non_finite_advice
from medgemma_breakhis.track import runs

logger = logging.getLogger(__name__)


def run_evaluation(
    params: Params,
    stage: str,
    *,
    image_root: Path,
    test_csv: Path,
    metrics_path: Path,
    predictions_path: Path,
    roc_path: Path,
    headline_path: Path | None = None,
    adapter_dir: Path | None = None,
    register: Callable[..., object] | None = None,
    predict: Callable[..., pd.DataFrame] = predict_split,
) -> dict[str, Any]:
    """Predict the test split (`predict`: by the model's answers, or `scoring.probe_predictions`) and write the metrics
    (and the few `ON_SCREEN`), the predictions and the ROC curve; returns the metrics. With `adapter_dir`, the adapter
    is applied unmerged (docs/design.md), and `register` (`registry.model.register_adapter`) makes it a version, last."""
    rows = read_split(test_csv, image_root)
    if adapter_dir is not None and not (adapter_dir / "adapter_config.json").is_file():
        raise DataError(f"no adapter in {adapter_dir}; run `dvc repro train` first")
    check_model(params.model)
    with runs.tracked_run(stage, params, test_csv, runs.untracked_record(metrics_path)) as run:
        started = time.perf_counter()
        model, processor, info = load_base_model(params.model, params.eval.precision)
        run.tags |= info.tags(precision_ran=f"{info.dtype} weights, inference without autocast")
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, adapter_dir)
        loaded = time.perf_counter()
        try:
            predictions = predict(model, processor, rows, image_root, params.eval)
        except NonFiniteError as err:
            advice = non_finite_advice(params.eval.precision, "eval.precision")
            raise NonFiniteError(f"{stage}: {err}. {advice}") from err
        seconds = time.perf_counter() - loaded
        run.metrics |= {"time_model_load_s": loaded - started, "images_per_second": len(rows) / seconds}
        results = metrics.evaluation_metrics(predictions, params.eval.bootstrap_resamples, params.eval.seed)
        figures = metrics.headline(results)
        run.refuse_if_params_changed()
        roc = metrics.roc_points(predictions)
        atomic_write_text(predictions_path, predictions.to_csv(index=False))
        atomic_write_text(roc_path, roc.to_csv(index=False))
        atomic_write_json(metrics_path, results)
        run.parent_metrics |= {f"{metrics_path.stem}_{name}": value for name, value in figures.items()}
        if headline_path is not None:  # by the stage's name: `dvc exp show` gives each figure a column of its own
            shown = {key: figures[key] for key in metrics.ON_SCREEN if key in figures}
            atomic_write_json(headline_path, {headline_path.stem: shown})
        run.artifacts += [(path, path.parent.name) for path in (metrics_path, predictions_path, roc_path)]
        extra = ["unparseable"] if predictions["predicted"].eq(metrics.UNPARSEABLE).any() else []  # its own column
        for name, column, labels, title in (
            ("eight_class", "class", CLASS_NAMES, "8 classes"),
            ("binary", "binary", ("benign", "malignant"), "benign / malignant"),
        ):
            truth, predicted = predictions[f"true_{column}"], predictions[f"predicted_{column}"]
            figure = confusion_matrix_figure(truth, predicted, [*labels, *extra], f"{stage}: {title}")
            run.figures[f"confusion_matrix_{name}.png"] = figure
        if "roc_auc" in results["binary"]:
            run.figures["roc_curve.png"] = roc_figure(roc, results["binary"]["roc_auc"], stage)
        if adapter_dir is not None:
            md5 = runs.dvc_locked_md5(adapter_dir)
            run.tags["adapter_dvc_md5"] = md5 or "not in a dvc.lock (stage run outside DVC)"
            if md5 is not None:
                lineage = partial(runs.tag_train_run, run.parent_run_id, adapter_dir, {"adapter_dvc_md5": md5})
                run.then.append(("the adapter's DVC hash on its train run", lineage))
        if register is None or adapter_dir is None:
            run.metrics |= figures
        else:  # the registration logs the metrics with the model it registers, once the scored copy is freed
            del model
            gc.collect()
            torch.cuda.empty_cache()  # a no-op without CUDA
            md5 = run.tags["adapter_dvc_md5"]
            registration = partial(register, run.run_id, adapter_dir, params, info, md5, figures)
            what = f"the model version of {params.registry.model_name} and its metrics (`make register` tries again)"
            run.then.append((what, registration))
    how = f"eval.method={params.eval.method}" if predict is predict_split else "a linear probe"
    logger.info("%s (%s) on %d test images:\n%s", stage, how, len(rows), metrics.headline_table(results))
    return results


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
    figure = Figure(figsize=(5, 5), layout="constrained")
    axes = figure.subplots()
    display = RocCurveDisplay(fpr=roc["false_positive_rate"], tpr=roc["true_positive_rate"], roc_auc=auc, name=stage)
    display.plot(ax=axes, plot_chance_level=True)
    axes.set_title(f"{stage}: ROC, malignant positive")
    return figure
