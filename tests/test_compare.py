"""The paired comparison of two evaluations (tools/compare.py) on hand-made predictions: what it says of identical,
clearly better and unrelated evaluations, and why pairing narrows the interval."""

import numpy as np
import pandas as pd
import pytest

from medgemma_breakhis.evaluate.metrics import patient_bootstrap_ci, predictions_frame
from tools.compare import PairingError, paired_difference

PATIENTS = [f"p{index}" for index in range(12) for _ in range(5)]  # 12 patients, 5 images each
LABELS = [index % 8 for index in range(len(PATIENTS))]


def scored(correct: list[bool], filenames: list[str] | None = None) -> pd.DataFrame:
    """Predictions of the test images: right where `correct`, else the next class (the other side for 3 and 7)."""
    rows = pd.DataFrame(
        {"filename": filenames or [f"img{i:03d}.png" for i in range(len(PATIENTS))], "label": LABELS}
    ).assign(patient=PATIENTS)
    predicted = [label if right else (label + 1) % 8 for label, right in zip(LABELS, correct, strict=True)]
    return predictions_frame(rows, np.array(predicted))


def test_identical_predictions_differ_by_exactly_zero_with_no_detectable_difference() -> None:
    side = scored([i % 3 != 0 for i in range(len(PATIENTS))])
    table = paired_difference(side, side.copy(), resamples=1000, seed=0).set_index("metric")
    assert (table["B - A [95% interval]"] == "+0.000 [+0.000, +0.000]").all()
    assert (table["verdict"] == "no detectable difference at 95%").all()


def test_turning_enough_patients_from_wrong_to_right_is_better() -> None:
    before = [patient not in ("p0", "p1", "p2", "p3", "p4", "p5") for patient in PATIENTS]  # 6 patients all wrong
    after = [True] * len(PATIENTS)
    table = paired_difference(scored(before), scored(after), resamples=2000, seed=0).set_index("metric")
    assert table.loc["8-class accuracy", "B - A [95% interval]"].startswith("+0.500 [+")
    assert table.loc["8-class accuracy", "verdict"] == "better"
    assert table.loc["patient-level accuracy", "verdict"] == "better"
    reverse = paired_difference(scored(after), scored(before), resamples=2000, seed=0).set_index("metric")
    assert reverse.loc["8-class accuracy", "verdict"] == "worse"


def test_pairing_narrows_the_interval_of_correlated_predictions() -> None:
    """Two evaluations right on mostly the same images: each side's own interval spans its patients' spread, the
    paired one only where they differ."""
    rng = np.random.default_rng(0)
    a = rng.random(len(PATIENTS)) < 0.6
    b = a | (rng.random(len(PATIENTS)) < 0.15)  # B right wherever A is, and on a few more
    table = paired_difference(scored(list(a)), scored(list(b)), resamples=2000, seed=0).set_index("metric")
    low, high = (float(x) for x in table.loc["8-class accuracy", "B - A [95% interval]"].split("[")[1][:-1].split(","))
    own_low, own_high = patient_bootstrap_ci(a, np.array(PATIENTS), resamples=2000, seed=0)
    assert high - low < own_high - own_low


def test_evaluations_of_different_test_images_are_refused_as_a_pair() -> None:
    side = scored([True] * len(PATIENTS))
    other = scored([True] * len(PATIENTS), filenames=[f"other{i:03d}.png" for i in range(len(PATIENTS))])
    with pytest.raises(PairingError, match=r"^the two sides were scored on different test images .*cannot be paired"):
        paired_difference(side, other, resamples=100, seed=0)
