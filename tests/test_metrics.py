"""Metrics from hand-made predictions: intervals by patient, per-class figures, ROC-AUC, calibration, unparseable."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from medgemma_breakhis.data.breakhis import CLASS_NAMES
from medgemma_breakhis.evaluate.metrics import (
    HEADLINE,
    UNPARSEABLE,
    evaluation_metrics,
    expected_calibration_error,
    headline,
    headline_table,
    patient_bootstrap_ci,
    predictions_frame,
    roc_points,
)
from medgemma_breakhis.evaluate.scoring import parse_answer


def rows(labels: list[int], patients: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"filename": [f"img{i}.png" for i in range(len(labels))], "patient": patients, "label": labels})


def one_hot(predicted: list[int], confidence: float = 0.9) -> np.ndarray:
    probabilities = np.full((len(predicted), 8), (1 - confidence) / 7)
    probabilities[np.arange(len(predicted)), predicted] = confidence
    return probabilities


def test_interval_resamples_patients_not_images() -> None:
    # Patient a: 10 images all right; patient b: 10 images all wrong. Resampling patients gives accuracies 0, 0.5
    # or 1, so the interval spans [0, 1]; resampling 20 images would give a far narrower one.
    correct = np.array([True] * 10 + [False] * 10)
    patients = np.array(["a"] * 10 + ["b"] * 10)
    assert patient_bootstrap_ci(correct, patients, resamples=1000, seed=0) == (0.0, 1.0)


def test_interval_is_reproducible_brackets_the_accuracy_and_collapses_when_every_patient_agrees() -> None:
    rng = np.random.default_rng(1)
    patients = np.repeat([f"p{i}" for i in range(8)], 5)
    correct = rng.random(40) < 0.7
    low, high = patient_bootstrap_ci(correct, patients, resamples=1000, seed=3)
    assert (low, high) == patient_bootstrap_ci(correct, patients, resamples=1000, seed=3)
    assert low < correct.mean() < high
    assert patient_bootstrap_ci(np.ones(40, bool), patients, resamples=500, seed=0) == (1.0, 1.0)
    with pytest.raises(ValueError, match="at least two patients"):
        patient_bootstrap_ci(correct, np.array(["p"] * 40), resamples=500, seed=0)


def test_calibration_error_of_known_bins() -> None:
    # Two bins: confidence 0.95 with accuracy 1/2 (gap 0.45), confidence 0.55 with accuracy 1/2 (gap 0.05).
    confidence = np.array([0.95, 0.95, 0.55, 0.55])
    correct = np.array([True, False, True, False])
    assert expected_calibration_error(correct, confidence) == pytest.approx(0.5 * 0.45 + 0.5 * 0.05)
    assert expected_calibration_error(np.array([True, True]), np.array([1.0, 1.0])) == 0.0


def test_all_figures_on_hand_made_predictions() -> None:
    labels = [0, 1, 4, 5, 0, 4]
    predicted = [0, 2, 4, 4, 0, 1]
    table = predictions_frame(rows(labels, ["a", "a", "b", "b", "c", "d"]), np.array(predicted), one_hot(predicted))
    metrics = evaluation_metrics(table, resamples=500, seed=0)
    assert metrics["eight_class"]["accuracy"] == pytest.approx(3 / 6)
    assert metrics["binary"]["accuracy"] == pytest.approx(5 / 6)  # 1→2 and 5→4 keep their side; 4→1 does not
    assert metrics["binary"]["f1_malignant"] == pytest.approx(0.8)  # precision 2/2, recall 2/3
    for kind in ("eight_class", "binary"):
        assert metrics[kind]["accuracy_ci95_low"] <= metrics[kind]["accuracy"] <= metrics[kind]["accuracy_ci95_high"]
    per_class = metrics["eight_class"]["per_class"]
    assert list(per_class) == list(CLASS_NAMES)
    assert per_class["benign_adenosis"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert per_class["malignant_ductal_carcinoma"]["precision"] == pytest.approx(0.5)
    # Patient recognition rate: a 1/2, b 1/2, c 1, d 0 (8-class); binary a 1, b 1, c 1, d 0.
    assert metrics["patient_level"] == {"accuracy": 0.75, "eight_class_accuracy": 0.5, "n_patients": 4}
    # Malignant probability: 0.9 + 3 * 0.1/7 where 4 was predicted, else 4 * 0.1/7. Of the 9 malignant-benign
    # pairs, the two images predicted malignant win 6; the malignant image predicted benign ties 3 (half each).
    assert metrics["binary"]["roc_auc"] == pytest.approx(7.5 / 9)
    assert metrics["eight_class"]["expected_calibration_error"] == pytest.approx(abs(0.9 - 0.5))
    assert metrics["n_images"] == 6 and metrics["n_unparseable"] == 0


def test_unparseable_answers_are_counted_wrong_and_never_become_a_class() -> None:
    answers = ["4", "The answer is 0.", "I cannot tell", "9", "malignant", "7"]
    predicted = np.array([parse_answer(a) for a in answers])
    assert predicted.tolist() == [4, 0, UNPARSEABLE, UNPARSEABLE, UNPARSEABLE, 7]
    table = predictions_frame(rows([4, 0, 5, 1, 6, 7], ["a", "a", "b", "b", "c", "c"]), predicted, answers=answers)
    assert table["predicted_binary"].tolist() == [
        "malignant",
        "benign",
        "unparseable",
        "unparseable",
        "unparseable",
        "malignant",
    ]
    metrics = evaluation_metrics(table, resamples=500, seed=0)
    assert metrics["n_unparseable"] == 3
    assert metrics["eight_class"]["accuracy"] == pytest.approx(3 / 6)
    assert metrics["binary"]["accuracy"] == pytest.approx(3 / 6)
    assert metrics["binary"]["f1_malignant"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # 2 of 4 malignant found
    assert "roc_auc" not in metrics["binary"] and "expected_calibration_error" not in metrics["eight_class"]
    assert roc_points(table).empty
    # MLflow gets the headline figures the method has, and says nothing of those it lacks
    flat = headline(metrics)
    assert flat["n_unparseable"] == 3 and flat["eight_class_accuracy"] == pytest.approx(3 / 6)
    assert "binary_roc_auc" not in flat and "eight_class_expected_calibration_error" not in flat


def test_every_headline_figure_reaches_mlflow_with_its_interval() -> None:
    predicted = [0, 2, 4, 4, 0, 1]
    table = predictions_frame(
        rows([0, 1, 4, 5, 0, 4], ["a", "a", "b", "b", "c", "d"]), np.array(predicted), one_hot(predicted)
    )
    metrics = evaluation_metrics(table, resamples=500, seed=0)
    flat = headline(metrics)
    expected = {figure.mlflow_name for figure in HEADLINE}
    expected |= {
        f"{figure.mlflow_name}_ci95_{bound}" for figure in HEADLINE if figure.interval for bound in ("low", "high")
    }
    assert set(flat) == expected
    assert flat["binary_accuracy_ci95_high"] == metrics["binary"]["accuracy_ci95_high"]


def test_benign_or_malignant_of_scores_is_the_summed_malignant_probability_not_the_top_class() -> None:
    # a benign top class (0.30) but the four malignant classes sum to 0.503; a malignant top class (0.26) but 0.49
    probabilities = np.array(
        [[0.30, 0.10, 0.047, 0.05, 0.20, 0.103, 0.10, 0.10], [0.20, 0.11, 0.10, 0.10, 0.26, 0.08, 0.08, 0.07]]
    )
    table = predictions_frame(rows([4, 0], ["a", "b"]), probabilities.argmax(axis=1), probabilities)
    assert table["predicted_class"].tolist() == ["benign_adenosis", "malignant_ductal_carcinoma"]
    assert table["predicted_binary"].tolist() == ["malignant", "benign"]
    assert evaluation_metrics(table, resamples=100, seed=0)["binary"]["accuracy"] == 1.0
    generated = predictions_frame(rows([4, 0], ["a", "b"]), np.array([0, 4]), answers=["0", "4"])
    assert generated["predicted_binary"].tolist() == ["benign", "malignant"]  # no probabilities: the class's side


def test_a_stage_logs_its_headline_as_a_short_table_not_a_dict() -> None:
    predicted = [0, 2, 4, 4, 0, 1]
    table = predictions_frame(
        rows([0, 1, 4, 5, 0, 4], ["a", "a", "b", "b", "c", "d"]), np.array(predicted), one_hot(predicted)
    )
    metrics = evaluation_metrics(table, resamples=200, seed=0)
    lines = headline_table(metrics).splitlines()
    accuracy = metrics["eight_class"]["accuracy"]
    low, high = metrics["eight_class"]["accuracy_ci95_low"], metrics["eight_class"]["accuracy_ci95_high"]
    assert lines[0].split() == ["8-class", "accuracy", f"{accuracy:.3f}", f"[{low:.3f},", f"{high:.3f}]"]
    assert lines[-1].split() == ["unparseable", "answers", "0"]
    assert len(lines) == len(HEADLINE)  # a line each, each number of at most three decimals
    assert not any(re.search(r"\d\.\d{4}", line) for line in lines)
