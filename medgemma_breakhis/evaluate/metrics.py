"""Test-set metrics of a predictions table (one row per image), with 95% intervals from a bootstrap over patients
(docs/metrics.md). Free of any model: tested on hand-made rows."""

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import binned_statistic, bootstrap
from sklearn.metrics import f1_score, precision_recall_fscore_support, roc_auc_score, roc_curve

from medgemma_breakhis.core.params import dotted_get
from medgemma_breakhis.data.breakhis import CLASS_NAMES, NUM_CLASSES, binary_name, is_malignant

logger = logging.getLogger(__name__)

UNPARSEABLE = -1  # a generated answer with no class number in it: its own outcome, never a class
PROBABILITY_COLUMNS = [f"prob_{name}" for name in CLASS_NAMES]
MALIGNANT_COLUMNS = [column for label, column in enumerate(PROBABILITY_COLUMNS) if is_malignant(label)]


def predictions_frame(
    rows: pd.DataFrame, predicted: np.ndarray, probabilities: np.ndarray | None = None, answers: list[str] | None = None
) -> pd.DataFrame:
    """One row per image: file, patient, true and predicted class (number, name, binary), and the probability of each
    class or the generated answer."""
    class_names = dict(enumerate(CLASS_NAMES)) | {UNPARSEABLE: "unparseable"}
    binary_names = {label: binary_name(label) for label in range(NUM_CLASSES)} | {UNPARSEABLE: "unparseable"}
    frame = rows[["filename", "patient", "label"]].reset_index(drop=True)
    frame["predicted"] = np.asarray(predicted, dtype=int)
    frame["true_class"] = frame["label"].map(class_names)
    frame["predicted_class"] = frame["predicted"].map(class_names)
    frame["true_binary"] = frame["label"].map(binary_names)
    frame["predicted_binary"] = frame["predicted"].map(binary_names)
    if probabilities is not None:
        frame[PROBABILITY_COLUMNS] = probabilities
        frame["predicted_binary"] = binary_prediction(frame)
    if answers is not None:
        frame["answer"] = answers
    return frame


def patient_bootstrap_ci(correct: np.ndarray, patients: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the accuracy when whole patients are drawn with replacement."""
    per_patient = pd.DataFrame({"patient": patients, "correct": correct}).groupby("patient")["correct"]
    hits, images = per_patient.sum().to_numpy(), per_patient.count().to_numpy()
    if len(hits) < 2:
        raise ValueError("a patient bootstrap needs at least two patients in the test set")
    result = bootstrap(
        (hits, images),
        lambda h, n, axis: h.sum(axis=axis) / n.sum(axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=resamples,
        confidence_level=0.95,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def expected_calibration_error(correct: np.ndarray, confidence: np.ndarray, bins: int = 10) -> float:
    """Mean gap between confidence and accuracy over equal-width confidence bins, weighted by the images in each."""
    gaps = binned_statistic(confidence, correct - confidence, "sum", bins=np.linspace(0.0, 1.0, bins + 1)).statistic
    return float(np.abs(gaps).sum() / len(confidence))


def malignant_probability(predictions: pd.DataFrame) -> pd.Series:
    """The summed probability of the four malignant classes (NaN where a row has no probabilities)."""
    return predictions[MALIGNANT_COLUMNS].sum(axis=1, min_count=1)


def binary_prediction(predictions: pd.DataFrame) -> pd.Series:
    """Benign/malignant by the one rule: malignant where the four malignant classes' summed probability is >= 0.5."""
    return malignant_probability(predictions).ge(0.5).map({True: "malignant", False: "benign"})


def roc_points(predictions: pd.DataFrame) -> pd.DataFrame:
    """The binary ROC curve (malignant positive) from the summed malignant probabilities; empty without them."""
    if PROBABILITY_COLUMNS[0] not in predictions:
        return pd.DataFrame(columns=["false_positive_rate", "true_positive_rate"])
    fpr, tpr, _ = roc_curve(predictions["true_binary"] == "malignant", malignant_probability(predictions))
    return pd.DataFrame({"false_positive_rate": fpr, "true_positive_rate": tpr})


def _accuracy_with_ci(
    truth: pd.Series, predicted: pd.Series, patients: pd.Series, resamples: int, seed: int
) -> dict[str, float]:
    correct = (truth == predicted).to_numpy()
    low, high = patient_bootstrap_ci(correct, patients.to_numpy(), resamples, seed)
    return {"accuracy": float(correct.mean()), "accuracy_ci95_low": low, "accuracy_ci95_high": high}


def evaluation_metrics(predictions: pd.DataFrame, resamples: int, seed: int) -> dict[str, Any]:
    """All test-set metrics of a predictions table (`predictions_frame`), as docs/metrics.md defines them."""
    labels, predicted, patients = predictions["label"], predictions["predicted"], predictions["patient"]
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=list(range(NUM_CLASSES)), zero_division=0
    )
    per_class = zip(CLASS_NAMES, precision, recall, f1, support, strict=True)
    eight_class = {
        **_accuracy_with_ci(labels, predicted, patients, resamples, seed),
        "f1_weighted": float(np.average(f1, weights=support)),  # as sklearn's average="weighted"
        "per_class": {n: {"precision": p, "recall": r, "f1": f, "support": int(s)} for n, p, r, f, s in per_class},
    }
    true_binary, predicted_binary = predictions["true_binary"], predictions["predicted_binary"]
    # labels=["malignant"]: an unparseable answer is a missed malignant, never a third class that breaks F1
    f1_malignant = f1_score(true_binary, predicted_binary, labels=["malignant"], average="macro", zero_division=0)
    binary = {
        **_accuracy_with_ci(true_binary, predicted_binary, patients, resamples, seed),
        "f1_malignant": float(f1_malignant),
    }
    if PROBABILITY_COLUMNS[0] in predictions:
        if true_binary.nunique() == 2:
            binary["roc_auc"] = float(roc_auc_score(true_binary == "malignant", malignant_probability(predictions)))
        else:
            logger.warning("binary.roc_auc is left out: the test set holds only %s images", true_binary.iloc[0])
        eight_class["expected_calibration_error"] = expected_calibration_error(
            (labels == predicted).to_numpy(), predictions[PROBABILITY_COLUMNS].to_numpy().max(axis=1)
        )
    hits = pd.DataFrame({"binary_hit": true_binary == predicted_binary, "hit": labels == predicted})
    per_patient = hits.groupby(patients).mean()
    return {
        "eight_class": eight_class,
        "binary": binary,
        "patient_level": {
            "accuracy": float(per_patient["binary_hit"].mean()),
            "eight_class_accuracy": float(per_patient["hit"].mean()),
            "n_patients": len(per_patient),
        },
        "n_images": len(predictions),
        "n_unparseable": int((predicted == UNPARSEABLE).sum()),
    }


@dataclass(frozen=True)
class Headline:
    """A figure reported everywhere: MLflow, the stages' log, the cross-validation table, the demo, the PR report."""

    key: str  # the dotted key in metrics/<stage>.json, as `dvc metrics show` names it
    label: str  # how tables name it
    interval: bool = False  # it has a 95% interval beside it: <key>_ci95_low, <key>_ci95_high

    @property
    def mlflow_name(self) -> str:
        return self.key.replace(".", "_")


# The one list: a metric added to `evaluation_metrics` is reported once it is listed here.
HEADLINE = (
    Headline("eight_class.accuracy", "8-class accuracy", interval=True),
    Headline("eight_class.f1_weighted", "8-class F1 (weighted)"),
    Headline("eight_class.expected_calibration_error", "8-class calibration error"),  # score only
    Headline("binary.accuracy", "binary accuracy", interval=True),
    Headline("binary.f1_malignant", "binary F1 (malignant)"),
    Headline("binary.roc_auc", "binary ROC-AUC"),  # score only, and a test set with both classes
    Headline("patient_level.accuracy", "patient-level accuracy"),
    Headline("n_unparseable", "unparseable answers"),  # generate only can have any
)
# The few that `dvc exp show` and `dvc metrics diff` list (metrics/headline/), by their MLflow names.
ON_SCREEN = ("eight_class_accuracy", "binary_roc_auc")


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The headline figures of a metrics file that it has, flat, by their MLflow names."""
    flat = {}
    for figure in HEADLINE:
        if dotted_get(metrics, figure.key) is not None:
            suffixes = ("", "_ci95_low", "_ci95_high") if figure.interval else ("",)
            flat |= {figure.mlflow_name + suffix: dotted_get(metrics, figure.key + suffix) for suffix in suffixes}
    return flat


def headline_table(metrics: dict[str, Any]) -> str:
    """The headline figures a metrics file has, a line each: label, value and 95% interval."""
    lines = []
    for figure in HEADLINE:
        if isinstance(value := dotted_get(metrics, figure.key), float):
            value = f"{value:.3f}"  # a count is shown as it is
        low, high = (dotted_get(metrics, f"{figure.key}_ci95_{bound}") for bound in ("low", "high"))
        if value is not None:
            lines.append(f"  {figure.label:<28}{value}" + (f" [{low:.3f}, {high:.3f}]" if figure.interval else ""))
    return "\n".join(lines)
